"""Small PyTorch statements of ConvNeXt, written for the tests from the published definitions.

`OfficialConvNeXt` / `OfficialIsotropic` follow facebookresearch/ConvNeXt (and ConvNeXt-V2
for GRN): module names give the official state-dict keys. `TimmConvNeXt` follows timm's
module names (`stem`, `stages.i.downsample`, `blocks`, `conv_dw`, `mlp.fc1`, `head.fc`),
including its 1x1-conv MLP (`conv_mlp=True`) used for atto..nano. timm itself cannot be
installed here (it needs torchvision), so these stand in for it as independent references.
"""

import torch
from torch import nn
import torch.nn.functional as F


class ChannelsFirstLayerNorm(nn.Module):
  """LayerNorm over dim 1 of an NCHW tensor."""

  def __init__(self, dim, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.eps = eps

  def forward(self, x):
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
    return y.permute(0, 3, 1, 2)


class OfficialGRN(nn.Module):
  """ConvNeXt-V2 GRN on NHWC input, parameters (1, 1, 1, C) named gamma/beta."""

  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
    self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

  def forward(self, x):
    gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return self.gamma * (x * nx) + self.beta + x


class OfficialBlock(nn.Module):

  def __init__(self, dim, layer_scale, use_grn, eps):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=eps)
    self.pwconv1 = nn.Linear(dim, 4 * dim)
    self.grn = OfficialGRN(4 * dim) if use_grn else None
    self.pwconv2 = nn.Linear(4 * dim, dim)
    self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None

  def forward(self, x):
    y = self.dwconv(x).permute(0, 2, 3, 1)
    y = F.gelu(self.pwconv1(self.norm(y)))
    if self.grn is not None:
      y = self.grn(y)
    y = self.pwconv2(y)
    if self.gamma is not None:
      y = self.gamma * y
    return x + y.permute(0, 3, 1, 2)


class OfficialConvNeXt(nn.Module):
  """Hierarchical ConvNeXt with the official module names; `stages` are returned too."""

  def __init__(self, depths, dims, num_classes=1000, layer_scale=1e-6, use_grn=False, eps=1e-6):
    super().__init__()
    self.downsample_layers = nn.ModuleList(
        [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0], eps))]
    )
    for i in range(1, len(dims)):
      self.downsample_layers.append(
          nn.Sequential(
              ChannelsFirstLayerNorm(dims[i - 1], eps), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)
          )
      )
    self.stages = nn.ModuleList(
        [
            nn.Sequential(*[OfficialBlock(d, layer_scale, use_grn, eps) for _ in range(n)])
            for n, d in zip(depths, dims)
        ]
    )
    self.norm = nn.LayerNorm(dims[-1], eps=eps)
    self.head = nn.Linear(dims[-1], num_classes)

  def forward(self, x):
    stage_maps = []
    for down, stage in zip(self.downsample_layers, self.stages):
      x = stage(down(x))
      stage_maps.append(x)
    return self.head(self.norm(x.mean((-2, -1)))), stage_maps


class OfficialIsotropic(nn.Module):

  def __init__(self, depth, dim, num_classes=1000, layer_scale=0.0, eps=1e-6):
    super().__init__()
    self.stem = nn.Conv2d(3, dim, 16, stride=16)
    self.blocks = nn.Sequential(
        *[OfficialBlock(dim, layer_scale, False, eps) for _ in range(depth)]
    )
    self.norm = nn.LayerNorm(dim, eps=eps)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.head(self.norm(x.mean((-2, -1)))), [x]


class TimmGRN(nn.Module):
  """timm's GRN: weight/bias of shape (C,), channels-last or channels-first input."""

  def __init__(self, dim, channels_last):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.spatial, self.channel = ((1, 2), -1) if channels_last else ((2, 3), 1)
    self.view = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)

  def forward(self, x):
    gx = x.norm(p=2, dim=self.spatial, keepdim=True)
    nx = gx / (gx.mean(dim=self.channel, keepdim=True) + 1e-6)
    return x + self.bias.view(self.view) + self.weight.view(self.view) * (x * nx)


class TimmMlp(nn.Module):

  def __init__(self, dim, use_grn, conv_mlp):
    super().__init__()
    layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv_mlp else nn.Linear
    self.fc1 = layer(dim, 4 * dim)
    self.grn = TimmGRN(4 * dim, channels_last=not conv_mlp) if use_grn else None
    self.fc2 = layer(4 * dim, dim)

  def forward(self, x):
    x = F.gelu(self.fc1(x))
    if self.grn is not None:
      x = self.grn(x)
    return self.fc2(x)


class TimmBlock(nn.Module):

  def __init__(self, dim, layer_scale, use_grn, conv_mlp, eps):
    super().__init__()
    self.conv_mlp = conv_mlp
    self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = ChannelsFirstLayerNorm(dim, eps) if conv_mlp else nn.LayerNorm(dim, eps=eps)
    self.mlp = TimmMlp(dim, use_grn, conv_mlp)
    self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None

  def forward(self, x):
    y = self.conv_dw(x)
    if self.conv_mlp:
      y = self.mlp(self.norm(y))
    else:
      y = self.mlp(self.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    if self.gamma is not None:
      y = y * self.gamma.reshape(1, -1, 1, 1)
    return x + y


class TimmStage(nn.Module):

  def __init__(self, in_dim, dim, depth, layer_scale, use_grn, conv_mlp, eps, first):
    super().__init__()
    self.downsample = (
        nn.Identity()
        if first
        else nn.Sequential(ChannelsFirstLayerNorm(in_dim, eps), nn.Conv2d(in_dim, dim, 2, stride=2))
    )
    self.blocks = nn.Sequential(
        *[TimmBlock(dim, layer_scale, use_grn, conv_mlp, eps) for _ in range(depth)]
    )

  def forward(self, x):
    return self.blocks(self.downsample(x))


class TimmHead(nn.Module):

  def __init__(self, dim, num_classes, eps):
    super().__init__()
    self.norm = ChannelsFirstLayerNorm(dim, eps)
    self.fc = nn.Linear(dim, num_classes) if num_classes else nn.Identity()  # As timm's.

  def forward(self, x):
    return self.fc(self.norm(x.mean((-2, -1), keepdim=True)).flatten(1))


class TimmConvNeXt(nn.Module):
  """Hierarchical ConvNeXt with timm's module names."""

  def __init__(
      self,
      depths,
      dims,
      num_classes=1000,
      layer_scale=1e-6,
      use_grn=False,
      conv_mlp=False,
      eps=1e-6,
  ):
    super().__init__()
    self.stem = nn.Sequential(
        nn.Conv2d(3, dims[0], 4, stride=4), ChannelsFirstLayerNorm(dims[0], eps)
    )
    self.stages = nn.Sequential(
        *[
            TimmStage(
                dims[max(i - 1, 0)],
                dims[i],
                depths[i],
                layer_scale,
                use_grn,
                conv_mlp,
                eps,
                first=i == 0,
            )
            for i in range(len(dims))
        ]
    )
    self.head = TimmHead(dims[-1], num_classes, eps)

  def forward(self, x):
    x = self.stem(x)
    stage_maps = []
    for stage in self.stages:
      x = stage(x)
      stage_maps.append(x)
    return self.head(x), stage_maps


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
  """Fills every parameter with values that exercise it: fan-in-scaled weights, LayerNorm
  scales near 1, and biases, layer scales and GRN parameters of order 0.1 (their zero or 1e-6
  inits would hide a wrongly mapped tensor). Works on any ConvNeXt module tree (HF too)."""
  generator = torch.Generator().manual_seed(seed)
  norm_scales = {
      id(m.weight)
      for m in module.modules()
      if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith('LayerNorm')
  }
  with torch.no_grad():
    for p in module.parameters():
      noise = torch.randn(p.shape, generator=generator)
      if id(p) in norm_scales:
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim >= 2 and p.numel() > p.shape[-1]:  # conv / linear weights
        p.copy_(noise / p[0].numel() ** 0.5)
      else:
        p.copy_(0.1 * noise)
  return module.eval()
