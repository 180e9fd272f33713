"""vLLM plugin entry point (``vllm.general_plugins`` in pyproject.toml): registers the Parcae architecture.

vLLM calls :func:`register` in every process it starts, so ``LLM("out/<run>-hf")`` and ``vllm serve out/<run>-hf``
find ``ParcaeForCausalLM`` (parcae/hf/vllm_model.py) once parcae is installed beside vLLM
(scripts/setup_vllm_env.sh). The import of vLLM's model code is deferred to the model's first use.
"""


def register() -> None:
    from vllm import ModelRegistry

    from . import ParcaeConfig  # noqa: F401  (registers model_type "parcae" with AutoConfig: no remote code needed)

    if "ParcaeForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("ParcaeForCausalLM", "parcae.hf.vllm_model:ParcaeForCausalLM")
