"""Named device classes of the simulation engine: a throughput figure per class, with where it comes from.

The figure is the fp32 dense-matrix throughput (GFLOP/s) that ONE thread of the edge runtime gets on that
device (the edge runs one intra-op thread), except `gpu-server`, which is a whole GPU. The simulator turns it
into a slowdown against the machine it runs on: edge_factor = host GFLOP/s (measured once by a fp32 matmul
probe through ONNX Runtime, see splitwave.sim.devices) / class GFLOP/s.

How the figures were derived (all approximate: they place a class within a factor of ~2, no better):
* HPL (High-Performance Linpack) results are FP64 over all cores: divided by the core count, and doubled for
  fp32, since the SIMD units hold twice as many fp32 lanes. Source: Jeff Geerling's results table,
  github.com/geerlingguy/top500-benchmark (README, "Results"), one HPL run per board/PC.
* BERT-base at 128 tokens is 22.35 GFLOP per sequence forward (splitwave.sim.flops' count: 2 FLOP per
  multiply-add, linear layers + attention, 12 layers, hidden 768, intermediate 3072).

Kept here (not in splitwave.sim) so that the config schema can reject an unknown class name at load time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceClass:
    name: str
    gflops: float  # fp32 GFLOP/s of one edge-runtime thread (gpu-server: the whole GPU)
    device: str  # the concrete device the figure was measured on
    source: str  # where the figure comes from and how it was derived


DEVICE_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass(
            "phone",
            16.0,
            "Google Pixel 4 (Snapdragon 855, Cortex-A76 big cores)",
            "MobileBERT paper (Sun et al., ACL 2020, arXiv:2004.02984): MobileBERT takes 62 ms per 128-token "
            "sequence on a Pixel 4 and is 5.5x faster than BERT-base, so BERT-base ~341 ms; 22.35 GFLOP / 0.341 s "
            "= 65.5 GFLOP/s with TensorFlow Lite on (we assume) 4 threads -> ~16 per thread. Approximate: a short "
            "inference burst; a phone training for minutes throttles below this",
        ),
        DeviceClass(
            "phone-low",
            2.8,
            "Rockchip RK3566 (4x Cortex-A55 @ 1.8 GHz, the little cores of budget phones), Orange Pi CM4",
            "HPL 5.604 GFLOP/s FP64 on 4 cores (geerlingguy/top500-benchmark) -> 1.4 per core -> x2 fp32. Approximate",
        ),
        DeviceClass(
            "rpi4",
            5.9,
            "Raspberry Pi 4 (BCM2711, 4x Cortex-A72 @ 1.8 GHz)",
            "HPL 11.889 GFLOP/s FP64 on 4 cores (geerlingguy/top500-benchmark) -> 2.97 per core -> x2 fp32. "
            "Approximate",
        ),
        DeviceClass(
            "rpi5",
            15.1,
            "Raspberry Pi 5 (BCM2712, 4x Cortex-A76 @ 2.4 GHz)",
            "HPL 30.249 GFLOP/s FP64 on 4 cores (geerlingguy/top500-benchmark) -> 7.56 per core -> x2 fp32. "
            "Approximate (agrees with the phone class, whose big cores are also Cortex-A76)",
        ),
        DeviceClass(
            "laptop",
            36.2,
            "Intel Core i5-7400T (4-core Kaby Lake, 35 W: laptop-class cores), Lenovo M710q Tiny",
            "HPL 72.472 GFLOP/s FP64 on 4 cores (geerlingguy/top500-benchmark) -> 18.1 per core -> x2 fp32. "
            "Approximate",
        ),
        DeviceClass(
            "desktop",
            76.3,
            "AMD Ryzen 5 5600X (6 cores @ 3.7 GHz)",
            "HPL 229 GFLOP/s FP64 on 6 cores (geerlingguy/top500-benchmark) -> 38.2 per core -> x2 fp32. Approximate",
        ),
        DeviceClass(
            "gpu-server",
            13400.0,
            "NVIDIA A100 (whole GPU)",
            "NVIDIA FasterTransformer docs/bert_guide.md, 'BERT performance on A100 and TensorFlow', FP32 with "
            "TF32 off: BERT-base forward, batch 8 x 128 tokens, TensorFlow+XLA 13.29 ms -> 8 x 22.35 GFLOP / "
            "13.29 ms = 13.4 TFLOP/s. Approximate: inference with XLA; an eager PyTorch training step on small "
            "batches gets less (small steps are bound by kernel launches, not FLOPs)",
        ),
    )
}

#: the machine the simulation runs on: factor 1 by definition, no calibration needed
HOST = "host"


def class_names() -> list[str]:
    return [HOST, *DEVICE_CLASSES]
