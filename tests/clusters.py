"""Cluster files for tests: a device -> edge -> cloud chain with its links, and optional pins."""


def three_tier(pin: str = "", edge: str = "jetson-nano", uplink: str = "20Mbit/s, latency: 5ms") -> str:
    """Return cluster YAML: rpi4 (torchscript) -> ``edge`` (onnx) -> cloud-cpu (onnx).

    ``pin`` is a YAML mapping for ``constraints.pin`` ("" for no constraints); ``uplink`` is
    the device -> edge link's ``bandwidth: ..., latency: ...`` text.
    """
    text = f"""\
tiers:
  - {{name: device, target: rpi4, backend: torchscript}}
  - {{name: edge, target: {edge}, backend: onnx}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: device, to: edge, bandwidth: {uplink}}}
  - {{from: edge, to: cloud, bandwidth: 50Mbit/s, latency: 20ms}}
"""
    return text + (f"constraints:\n  pin: {pin}\n" if pin else "")


def two_tier(link: str) -> str:
    """Return cluster YAML: rpi4 (torchscript) -> cloud-cpu (onnx), ``link`` being the link's
    ``bandwidth: ..., latency: ...`` text."""
    return f"""\
tiers:
  - {{name: device, target: rpi4, backend: torchscript}}
  - {{name: cloud, target: cloud-cpu, backend: onnx}}
links:
  - {{from: device, to: cloud, {link}}}
"""


# rpi4 -> two jetson-nano nodes joined by 1 Gbit/s: resnet18's edge part (112x112) tiles over both.
TILED = """\
tiers:
  - {name: device, target: rpi4, backend: torchscript}
  - {name: edge, target: jetson-nano, backend: onnx, nodes: 2}
links:
  - {from: device, to: edge, bandwidth: 100Mbit/s, latency: 2ms}
  - {from: edge, to: edge, bandwidth: 1Gbit/s, latency: 0.2ms}
constraints:
  pin: {device: [conv1]}
"""
