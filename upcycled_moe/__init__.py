"""upcycled-moe: dense Hugging Face LLMs upcycled into Mixture-of-Experts models.

Importing the package registers the model family with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_upcycled_moe import UpcycledMoeConfig
from .modeling_upcycled_moe import (
    UpcycledMoeForCausalLM,
    UpcycledMoeForQuestionAnswering,
    UpcycledMoeForSequenceClassification,
    UpcycledMoeForTokenClassification,
    UpcycledMoeModel,
    UpcycledMoePreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(UpcycledMoeConfig.model_type, UpcycledMoeConfig, exist_ok=True)
AutoModel.register(UpcycledMoeConfig, UpcycledMoeModel, exist_ok=True)
AutoModelForCausalLM.register(UpcycledMoeConfig, UpcycledMoeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(UpcycledMoeConfig, UpcycledMoeForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(UpcycledMoeConfig, UpcycledMoeForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(UpcycledMoeConfig, UpcycledMoeForQuestionAnswering, exist_ok=True)

__all__ = [
    "UpcycledMoeConfig",
    "UpcycledMoeForCausalLM",
    "UpcycledMoeForQuestionAnswering",
    "UpcycledMoeForSequenceClassification",
    "UpcycledMoeForTokenClassification",
    "UpcycledMoeModel",
    "UpcycledMoePreTrainedModel",
    "__version__",
]
