"""parcae.hf: Parcae, RDM and GPT models as Hugging Face ``transformers`` classes (optional extra ``parcae[hf]``).

configuration_parcae.py and modeling_parcae.py are self-contained (torch + transformers only, no import of
``parcae``): ``parcae export --format hf`` copies them verbatim into the folder it writes, so the folder loads with
``trust_remote_code=True`` anywhere. Importing this package registers the same classes with the Auto classes, so
with parcae installed no remote code is needed:

    import parcae.hf  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/mini-parcae-hf")

docs/ecosystem.md walks through transformers, lm-eval, PEFT and vLLM.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_parcae import ParcaeConfig
from .modeling_parcae import ParcaeForCausalLM, ParcaeModel

AutoConfig.register(ParcaeConfig.model_type, ParcaeConfig, exist_ok=True)
AutoModelForCausalLM.register(ParcaeConfig, ParcaeForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map and copies the two code files, so any folder saved from these classes (a
# merged LoRA fine-tune, for one) loads elsewhere with trust_remote_code, as an exported folder does.
ParcaeConfig.register_for_auto_class()
ParcaeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ParcaeConfig", "ParcaeForCausalLM", "ParcaeModel"]
