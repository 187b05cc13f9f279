"""upcycled-moe: dense Hugging Face LLMs upcycled into Mixture-of-Experts models.

Importing the package registers the model family with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import UpcycledMoeForCausalLM, UpcycledMoeModel, UpcycledMoePreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
AutoModel.register(UpcycledMoeConfig, UpcycledMoeModel, exist_ok=True)
AutoModelForCausalLM.register(UpcycledMoeConfig, UpcycledMoeForCausalLM, exist_ok=True)

__all__ = [
    "UpcycledMoeConfig",
    "UpcycledMoeForCausalLM",
    "UpcycledMoeModel",
    "UpcycledMoePreTrainedModel",
    "__version__",
]
