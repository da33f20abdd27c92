r"""The PyTorch reference point of benchmarks/cpu_options.py: one WRN-28-2 train step.

  pip install torch --index-url https://download.pytorch.org/whl/cpu
  python benchmarks/torch_wrn.py --batch 64 --threads 2

The same network as `r2d2_jax/models/wide_resnet.py` (pre-activation blocks,
BatchNorm ε 1e-3, LeakyReLU 0.1, 3x3 convolutions without bias, 1x1 projection
shortcuts, global pooling, a dense classifier) and the same supervised step
(forward in train mode, cross-entropy, backward, SGD with Nesterov momentum
0.9 and weight decay) on random 32x32x3 images, channels-last memory format
(oneDNN's preferred one on CPU). Prints the median step time in ms over
`--steps` steps after `--warmup` steps, as one JSON line. Not imported by the
library and not a dependency: torch is only needed to run this file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


class Block(nn.Module):
  """BN-act-conv3x3-BN-act-conv3x3 (+ shortcut), as WRNBlock."""

  def __init__(self, cin: int, cout: int, stride: int, act_before: bool):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, eps=1e-3, momentum=0.001)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.001)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.act = nn.LeakyReLU(0.1)
    self.act_before = act_before
    self.shortcut = (nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                     if cin != cout or stride != 1 else None)

  def forward(self, x):
    y = self.act(self.bn1(x))
    shortcut = y if self.act_before else x
    y = self.conv2(self.act(self.bn2(self.conv1(y))))
    if self.shortcut is not None:
      shortcut = self.shortcut(shortcut)
    return shortcut + y


class WRN(nn.Module):
  """WRN-28-width for 32x32 inputs."""

  def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 2):
    super().__init__()
    n = (depth - 4) // 6
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
    for stage, mult in enumerate((1, 2, 4)):
      for i in range(n):
        cout = 16 * mult * width
        layers.append(Block(cin, cout, 2 if stage > 0 and i == 0 else 1,
                            stage == 0 and i == 0))
        cin = cout
    self.body = nn.Sequential(*layers)
    self.bn = nn.BatchNorm2d(cin, eps=1e-3, momentum=0.001)
    self.act = nn.LeakyReLU(0.1)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.act(self.bn(self.body(x)))
    return self.fc(x.mean((2, 3)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = WRN().to(memory_format=torch.channels_last).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9,
                        nesterov=True, weight_decay=5e-4)
  x = torch.randn(args.batch, 3, 32, 32).to(memory_format=torch.channels_last)
  y = torch.randint(0, 10, (args.batch,))
  times = []
  for k in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if k >= args.warmup:
      times.append(time.perf_counter() - t0)
  print(json.dumps({"torch": torch.__version__, "threads": args.threads,
                    "batch": args.batch,
                    "step_ms": 1e3 * statistics.median(times)}))


if __name__ == "__main__":
  main()
