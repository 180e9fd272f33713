"""parcae.hf: Parcae, RDM and GPT models as Hugging Face ``transformers`` classes (optional extra ``parcae[hf]``).

modeling_parcae.py wraps parcae's own model (``LoopedLM``) in transformers classes; ``save_pretrained`` (and so
``parcae export --format hf``) copies it, configuration_parcae.py and the torch-only model files it imports
(``modeling_parcae.REMOTE_CODE``) verbatim into the folder, so the folder loads with ``trust_remote_code=True``
anywhere, parcae installed or not. Importing this package registers the same classes with the Auto classes, so
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
# Any folder saved from these classes (a merged LoRA fine-tune, for one) gets auto_map and the remote code from
# ParcaePreTrainedModel.save_pretrained, so it loads elsewhere with trust_remote_code, as an exported folder does.
ParcaeConfig.register_for_auto_class()

__all__ = ["ParcaeConfig", "ParcaeForCausalLM", "ParcaeModel"]
