"""optimum-a3: analytical low-rank compression (A3, arXiv 2505.12942) for Hugging Face causal LMs."""

from transformers import AutoConfig, AutoModelForCausalLM

from .models.adapters import UnsupportedModelError, supported_model_types
from .calibration.windows import CalibrationDataError
from .compressor import A3Compressor
from .config import A3Config, A3ConfigError
from .errors import A3Error
from .models.a3_llama import A3LlamaConfig, A3LlamaForCausalLM
from .checkpoint.saving import OutputDirError
from .pipeline.statistics import NonFiniteStatisticsError
from .version import __version__

# With the package installed, checkpoints also load without trust_remote_code.
AutoConfig.register("a3_llama", A3LlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(A3LlamaConfig, A3LlamaForCausalLM, exist_ok=True)

__all__ = [
    "A3Compressor",
    "A3Config",
    "A3ConfigError",
    "A3Error",
    "A3LlamaConfig",
    "A3LlamaForCausalLM",
    "CalibrationDataError",
    "NonFiniteStatisticsError",
    "OutputDirError",
    "UnsupportedModelError",
    "supported_model_types",
    "__version__",
]
