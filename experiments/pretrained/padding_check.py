"""The ImageNet sanity check of the EfficientNet-Lite0 weights under each padding and input normalisation (issue 26).

The classifier the weight file ships (``_conv_head``, ``_bn1``, ``_fc``) on ovenet's encoder, on CamVid street
frames resized to 224x224 (every strided layer sees an even size, where TF's SAME and symmetric padding differ):
for padding symmetric / tf_same and normalisation ImageNet (mean/std x 255) / TF's Inception-style (x - 127) / 128,
the share of frames whose top-1 class is a street-scene one, the mean probability on street-scene classes, the mean
top-1 probability, and the KL divergence from what the weights compute (tf_same + TF normalisation, equal to the
reference network efficientnet-lite-pytorch: tests/test_encoder_reference.py).

    PYTHONPATH=src python experiments/pretrained/padding_check.py --data-root ../shared/data/camvid
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ovenet.data.transforms import IMAGENET, Normalisation, normalize
from ovenet.models.efficientnet import EfficientNetLite0Encoder, pretrained_file

# ImageNet classes a street scene may show (vehicles, signals, street furniture).
STREET = {407: "ambulance", 436: "beach wagon", 444: "tandem bicycle", 468: "cab", 511: "convertible",
          569: "garbage truck", 575: "golfcart", 609: "jeep", 627: "limousine", 656: "minivan", 661: "Model T", 670: "motor scooter",
          671: "mountain bike", 675: "moving van", 705: "passenger car", 717: "pickup", 734: "police van",
          751: "racer", 757: "recreational vehicle", 779: "school bus", 817: "sports car", 829: "streetcar",
          864: "tow truck", 867: "trailer truck", 874: "trolleybus", 919: "street sign", 920: "traffic light",
          565: "freight car", 555: "fire engine", 803: "snowplow", 654: "minibus", 880: "unicycle"}
TF_INCEPTION = Normalisation(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


def classifier(padding: str, source: dict) -> nn.Module:
    encoder = EfficientNetLite0Encoder(padding=padding).eval()
    encoder.load_state_dict({own: source[theirs] for own, theirs in encoder.pretrained_keys().items()})
    head = nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3), nn.ReLU6()).eval()
    head[0].weight.data = source["_conv_head.weight"]
    head[1].load_state_dict({k[len("_bn1."):]: v for k, v in source.items() if k.startswith("_bn1.")})
    fc = nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": source["_fc.weight"], "bias": source["_fc.bias"]})
    return nn.Sequential(_Features(encoder), head,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()


class _Features(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]


def frames(root: Path, count: int) -> list[Path]:
    """``count`` frames spread over val and train (several drives)."""
    out = []
    for split in ("val", "train"):
        files = sorted((root / split).glob("*.png")) + sorted((root / split).glob("*.jpg"))
        out += [files[int(i)] for i in np.linspace(0, len(files) - 1, count // 2)]
    return out


def feature_agreement(source: dict, frame: Path) -> list[dict]:
    """Cosine similarity and relative L2 distance of the symmetric encoder's four feature maps to the tf_same
    encoder's (what the weights compute), on one real frame at its own size."""
    image = normalize(np.asarray(Image.open(frame).convert("RGB")), normalisation=TF_INCEPTION)[None]
    maps = {}
    for padding in ("tf_same", "symmetric"):
        encoder = EfficientNetLite0Encoder(padding=padding).eval()
        encoder.load_state_dict({own: source[theirs] for own, theirs in encoder.pretrained_keys().items()})
        with torch.no_grad():
            maps[padding] = encoder(image)
    return [{"stride": stride, "size": list(a.shape[-2:]),
             "cosine": nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item(),
             "relative_l2": ((a - b).norm() / b.norm()).item()}
            for stride, a, b in zip((4, 8, 16, 32), maps["symmetric"], maps["tf_same"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=Path("../shared/data/camvid"))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("padding_check.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    source = torch.load(pretrained_file("efficientnet_lite0_imagenet"), weights_only=True)
    images = [np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in
              frames(args.data_root, args.frames)]
    probs = {}
    for padding in ("tf_same", "symmetric"):
        model = classifier(padding, source)
        for name, norm in (("tf_inception", TF_INCEPTION), ("imagenet", IMAGENET)):
            batch = torch.stack([normalize(image, normalisation=norm) for image in images])
            with torch.no_grad():
                probs[(padding, name)] = model(batch).softmax(1)
    reference = probs[("tf_same", "tf_inception")]
    street = torch.tensor(sorted(STREET))
    rows = []
    for (padding, name), prob in probs.items():
        top1 = prob.argmax(1)
        kl = (reference * (reference.clamp_min(1e-12).log() - prob.clamp_min(1e-12).log())).sum(1).mean().item()
        rows.append({"padding": padding, "normalisation": name, "frames": len(images),
                     "top1_street": float(np.isin(top1.numpy(), street.numpy()).mean()),
                     "street_probability": prob[:, street].sum(1).mean().item(),
                     "top1_probability": prob.max(1).values.mean().item(),
                     "top1_agrees_with_weights": (top1 == reference.argmax(1)).float().mean().item(),
                     "kl_from_weights": kl,
                     "top1_classes": [STREET.get(int(c), int(c)) for c in top1]})
    features = feature_agreement(source, frames(args.data_root, args.frames)[0])
    record = {"classifier": rows, "features_symmetric_vs_tf_same": features}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("| padding | normalisation | top-1 street | P(street) | top-1 prob | top-1 = weights' | KL from weights |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['padding']} | {r['normalisation']} | {r['top1_street']:.2f} | {r['street_probability']:.3f} | "
              f"{r['top1_probability']:.3f} | {r['top1_agrees_with_weights']:.2f} | {r['kl_from_weights']:.3f} |")
    for r in rows:
        print(r["padding"], r["normalisation"], r["top1_classes"])
    print("symmetric vs tf_same features, one frame at its 360x480, TF normalisation (cosine, relative L2):")
    for row in features:
        print(f"  stride {row['stride']}: {row['cosine']:.3f}, {row['relative_l2']:.3f}")


if __name__ == "__main__":
    main()
