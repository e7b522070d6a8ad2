"""medsr: super-resolution of MRI, CT, ultrasound and X-ray scans, with numbers that compare it to interpolation.

>>> import medsr
>>> model = medsr.load_model("edsr_mr_x2")
>>> model.scale, model.modality
((2, 2, 1), 'MR')
"""

from importlib.metadata import version

from medsr.degrade import Degradation, degrade
from medsr.evaluation import Evaluation, evaluate, evaluate_pair
from medsr.io import open_volume, read_volume, write_volume
from medsr.pipeline import MedsrWarning, Plan, trust_maps, upscale, upscale_file, upscale_folder
from medsr.uncertainty import TrustMaps
from medsr.volume import Modality, Volume
from medsr.zoo import SRModel, list_models, load_model

__version__ = version("medsr")

__all__ = [
    "Degradation",
    "Evaluation",
    "MedsrWarning",
    "Modality",
    "Plan",
    "SRModel",
    "TrustMaps",
    "Volume",
    "__version__",
    "degrade",
    "evaluate",
    "evaluate_pair",
    "list_models",
    "load_model",
    "open_volume",
    "read_volume",
    "trust_maps",
    "upscale",
    "upscale_file",
    "upscale_folder",
    "write_volume",
]
