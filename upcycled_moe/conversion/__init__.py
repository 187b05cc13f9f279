"""Dense checkpoints → UpcycledMoe: offline conversion (streamed, atomic), online upcycling, verification, export.

    from upcycled_moe.conversion import upcycle, upcycle_in_memory, verify, export
    upcycle("path/to/dense", "path/to/moe", num_experts=8, top_k=2)
"""

from .convert import plan_conversion, upcycle, upcycle_in_memory
from .errors import UpcycleError
from .export import export
from .options import UpcycleOptions
from .verify import verify

__all__ = ["UpcycleError", "UpcycleOptions", "export", "plan_conversion", "upcycle", "upcycle_in_memory", "verify"]
