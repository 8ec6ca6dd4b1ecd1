"""ovenet: OVeNet (Offset Vector Network) semantic segmentation on HRNetV2 and HRNetV2+OCR.

    import ovenet
    model = ovenet.load("runs/camvid_ovenet/best.pth")        # nn.Module in eval mode
    result = model.predict("street.png")                      # labels, offsets, confidence at input size
    net = ovenet.build_model(ovenet.load_config("cityscapes_hrnetv2_w48_ocr_ovenet").model)
"""

from .checkpoint import load
from .config import Config, load_config
from .errors import OvenetError
from .models import OVeNet, SegOutput, build_model

__version__ = "0.1.0"

__all__ = ["Config", "OVeNet", "OvenetError", "SegOutput", "__version__", "build_model", "load", "load_config"]
