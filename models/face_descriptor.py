"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) in PyTorch,
with dlib's own weights read from its file.

Why. The dlib-bin wheel is built without BLAS: one descriptor takes ~0.1–0.2 s on a core,
and the leak check describes every face several times per round (found again, at its box,
membership, blank), so the verifier was the largest share of a release's time. The same
network with the same weights in PyTorch (oneDNN convolutions) gives the same 128 numbers
(to ~1e-5, tests/models/test_face_descriptor.py compares it with dlib on real chips) an
order of magnitude faster. It is the same verifier, not a substitute.

The network (dlib's dnn_face_recognition_ex.cpp): a 7×7/2 convolution, 3×3/2 max pool, then
residual blocks of two 3×3 convolutions with per-channel affine (frozen batch norm) layers:
3 × 32, a downsampling block and 3 × 64, one and 2 × 128, one and 2 × 256, one more
downsampling 256 block, global average, a 128×256 matrix. A downsampling block adds its
input average-pooled 2×2/2 to its output; where the two differ in size (channels or
pixels) dlib adds them over the overlap and keeps the larger shape, zeros elsewhere.

The file is read as data (dlib's serialization: packed integers, floats as mantissa and
exponent, tensors as raw little-endian float32), never executed or unpickled. The layer
records are found by their type names ("con_4", "affine_", "max_pool_2", "avg_pool_2",
"fc_2", "input_rgb_image_sized") in file order, which is the order of the forward pass
(dlib writes the innermost layer first); their counts and shapes are checked against the
architecture above, so another file fails loudly instead of describing faces wrongly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Residual stages in forward order: (channels, blocks, first block downsamples).
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
CHIP_SIZE = 150


class DlibFileError(ValueError):
    """The .dat file is not the network this module implements."""


class _Reader:
    """dlib's serialization primitives over a bytes buffer."""

    def __init__(self, data: bytes, position: int):
        self.data, self.position = data, position

    def integer(self) -> int:
        # One control byte: low 4 bits = number of little-endian bytes that follow, bit 7 = negative.
        control = self.data[self.position]
        size = control & 0x0F
        value = int.from_bytes(self.data[self.position + 1:self.position + 1 + size], "little")
        self.position += 1 + size
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(np.ldexp(float(mantissa), exponent))

    def string(self) -> str:
        size = self.integer()
        text = self.data[self.position:self.position + size].decode("ascii")
        self.position += size
        return text

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFileError(f"tensor version {version} at byte {self.position} (expected 2)")
        shape = [self.integer() for _ in range(4)]
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.position)
        self.position += 4 * count
        return values.astype(np.float32)


def _records(data: bytes, name: str) -> list[_Reader]:
    """A reader positioned after every serialized string ``name`` in the file, in order."""
    token = bytes([0x01, len(name)]) + name.encode("ascii")
    readers, start = [], 0
    while (found := data.find(token, start)) >= 0:
        readers.append(_Reader(data, found + len(token)))
        start = found + len(token)
    return readers


@dataclass
class _Conv:
    weight: np.ndarray   # out × in × h × w
    bias: np.ndarray
    stride: int
    padding: int


def _convolutions(data: bytes) -> list[_Conv]:
    convolutions = []
    for reader in _records(data, "con_4"):
        params = reader.tensor()
        filters, rows, columns, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
        if rows != columns or stride_y != stride_x or pad_y != pad_x:
            raise DlibFileError(f"non-square convolution ({rows}x{columns}, stride {stride_y},{stride_x})")
        inputs, rest = divmod(len(params) - filters, filters * rows * columns)
        if rest:
            raise DlibFileError(f"a convolution's {len(params)} parameters do not fit {filters} {rows}x{columns} filters")
        weight = params[:filters * inputs * rows * columns].reshape(filters, inputs, rows, columns)
        convolutions.append(_Conv(weight, params[-filters:], stride_y, pad_y))
    return convolutions


def _affines(data: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    affines = []
    for reader in _records(data, "affine_"):
        params = reader.tensor()
        half = len(params) // 2
        affines.append((params[:half], params[half:]))
    return affines


def _pools(data: bytes, name: str) -> list[tuple[int, int, int]]:
    """(window, stride, padding) of each pooling layer; window 0 = the whole image."""
    pools = []
    for reader in _records(data, name):
        rows, columns, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
        if rows != columns or stride_y != stride_x or pad_y != pad_x:
            raise DlibFileError(f"non-square {name} ({rows}x{columns}, stride {stride_y},{stride_x})")
        pools.append((rows, stride_y, pad_y))
    return pools


def _input_means(data: bytes) -> tuple[float, float, float]:
    readers = _records(data, "input_rgb_image_sized")
    if len(readers) != 1:
        raise DlibFileError("no input_rgb_image_sized layer")
    reader = readers[0]
    means = (reader.real(), reader.real(), reader.real())
    if (reader.integer(), reader.integer()) != (CHIP_SIZE, CHIP_SIZE):
        raise DlibFileError(f"the network does not take {CHIP_SIZE}x{CHIP_SIZE} chips")
    return means


def _projection(data: bytes) -> np.ndarray:
    readers = _records(data, "fc_2")
    if len(readers) != 1:
        raise DlibFileError("no fc_2 layer")
    reader = readers[0]
    outputs, inputs = reader.integer(), reader.integer()
    params = reader.tensor()
    if len(params) != outputs * inputs:
        raise DlibFileError(f"fc layer: {len(params)} parameters for {inputs}->{outputs} without bias")
    return params.reshape(inputs, outputs)   # dlib multiplies x (N×in) by this in×out matrix


class _Block(nn.Module):
    """conv(stride) -> affine -> relu -> conv -> affine, plus the (pooled) input, then relu."""

    def __init__(self, first: _Conv, first_affine, second: _Conv, second_affine, skip_pool: tuple | None):
        super().__init__()
        # Only the geometry is kept: the arrays live on as the torch buffers below.
        self.steps = ((first.stride, first.padding), (second.stride, second.padding))
        for name, conv in (("w1", first), ("w2", second)):
            self.register_buffer(name, torch.from_numpy(conv.weight.copy()))
            self.register_buffer(name.replace("w", "b"), torch.from_numpy(conv.bias.copy()))
        for name, (gamma, beta) in (("a1", first_affine), ("a2", second_affine)):
            self.register_buffer(f"{name}_gamma", torch.from_numpy(gamma.copy()).view(1, -1, 1, 1))
            self.register_buffer(f"{name}_beta", torch.from_numpy(beta.copy()).view(1, -1, 1, 1))
        self.skip_pool = skip_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w1, self.b1, stride=self.steps[0][0], padding=self.steps[0][1])
        y = F.relu(y * self.a1_gamma + self.a1_beta)
        y = F.conv2d(y, self.w2, self.b2, stride=self.steps[1][0], padding=self.steps[1][1])
        y = y * self.a2_gamma + self.a2_beta
        skip = x
        if self.skip_pool is not None:
            window, stride, padding = self.skip_pool
            skip = F.avg_pool2d(x, window, stride, padding, count_include_pad=False)
        return F.relu(_add_over_overlap(y, skip))


def _add_over_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the larger shape, each tensor added where it has values (zeros elsewhere)."""
    if a.shape == b.shape:
        return a + b
    shape = [max(p, q) for p, q in zip(a.shape, b.shape)]
    out = a.new_zeros(shape)
    out[:, :a.shape[1], :a.shape[2], :a.shape[3]] += a
    out[:, :b.shape[1], :b.shape[2], :b.shape[3]] += b
    return out


class DlibFaceDescriptor(nn.Module):
    """128-D descriptors of 150×150 RGB face chips (dlib's ``get_face_chip``), as dlib's
    ``face_recognition_model_v1.compute_face_descriptor`` computes them."""

    def __init__(self, data: bytes):
        super().__init__()
        convolutions, affines = _convolutions(data), _affines(data)
        max_pools, avg_pools = _pools(data, "max_pool_2"), _pools(data, "avg_pool_2")
        blocks = sum(count for _, count, _ in STAGES)
        downsampling = sum(down for *_, down in STAGES)
        if (len(convolutions), len(affines), len(max_pools), len(avg_pools)) != \
                (1 + 2 * blocks, 1 + 2 * blocks, 1, downsampling + 1):
            raise DlibFileError(f"{len(convolutions)} convolutions, {len(affines)} affine, {len(max_pools)} max "
                                f"and {len(avg_pools)} average pools: not dlib's face-recognition ResNet v1")
        means = _input_means(data)
        self.register_buffer("means", torch.tensor(means, dtype=torch.float32).view(1, 3, 1, 1))
        stem = convolutions[0]
        self.stem_step = (stem.stride, stem.padding)
        self.register_buffer("stem_w", torch.from_numpy(stem.weight.copy()))
        self.register_buffer("stem_b", torch.from_numpy(stem.bias.copy()))
        self.register_buffer("stem_gamma", torch.from_numpy(affines[0][0].copy()).view(1, -1, 1, 1))
        self.register_buffer("stem_beta", torch.from_numpy(affines[0][1].copy()).view(1, -1, 1, 1))
        self.stem_pool = max_pools[0]
        # In file order an average pool follows its downsampling block's convolutions; the
        # last one (window 0) is the global average.
        pools = iter(avg_pools[:-1])
        modules, index = [], 1
        for channels, count, down in STAGES:
            for block in range(count):
                first, second = convolutions[index], convolutions[index + 1]
                if first.weight.shape[0] != channels or second.weight.shape[0] != channels:
                    raise DlibFileError(f"block {len(modules)}: {first.weight.shape[0]} filters, expected {channels}")
                pool = next(pools) if down and block == 0 else None
                modules.append(_Block(first, affines[index], second, affines[index + 1], pool))
                index += 2
        self.blocks = nn.Sequential(*modules)
        if avg_pools[-1][0] != 0:
            raise DlibFileError("the last average pool is not global")
        self.register_buffer("projection", torch.from_numpy(_projection(data).copy()))
        if self.projection.shape != (STAGES[-1][0], 128):
            raise DlibFileError(f"projection {tuple(self.projection.shape)}, expected (256, 128)")
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> DlibFaceDescriptor:
        return cls(Path(path).read_bytes())

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        """``chips``: N×150×150×3 uint8 (RGB) -> N×128 float32."""
        x = chips.permute(0, 3, 1, 2).float()
        x = (x - self.means) / 256.0
        x = F.conv2d(x, self.stem_w, self.stem_b, stride=self.stem_step[0], padding=self.stem_step[1])
        x = F.relu(x * self.stem_gamma + self.stem_beta)
        window, stride, padding = self.stem_pool
        x = F.max_pool2d(x, window, stride, padding)
        x = self.blocks(x)
        return x.mean(dim=(2, 3)) @ self.projection

    @torch.no_grad()
    def describe(self, chips: np.ndarray) -> np.ndarray:
        """``chips``: N×150×150×3 (or one 150×150×3) uint8 -> N×128 (or 128) float64."""
        single = chips.ndim == 3
        batch = torch.from_numpy(np.ascontiguousarray(chips[None] if single else chips))
        if batch.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise ValueError(f"face chips are {CHIP_SIZE}x{CHIP_SIZE}x3, got {tuple(batch.shape[1:])}")
        out = self(batch).double().numpy()
        return out[0] if single else out
