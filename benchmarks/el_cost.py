"""Cost of the Embedding Loss term's pieces for one generator update (docs/performance.md).

    python benchmarks/el_cost.py --kind vector --shape 2 --batch 256      # ring8 / grid25
    python benchmarks/el_cost.py --kind image --shape 1 8 8 --batch 64    # digits8

Draws K networks of the default pool for a few iterations (as a run does) and times, per network,
its two forwards (fake and real), the fused MMD forward, the MMD forward + backward, and all of it
with backward through the network; then the draw of the K networks. Milliseconds, 1 thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fewstep.core.kernels import mmd2_unbiased_pooled
from fewstep.models.embed import draw_networks

MULT = [0.25, 0.5, 1.0, 2.0, 4.0]


def ms(fn, n: int = 20) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def time_network(net, shape, batch: int) -> dict:
    """Milliseconds of each piece for one network (fake and real batches of ``batch``)."""
    xf, xr = torch.randn(batch, *shape).requires_grad_(), torch.randn(batch, *shape)
    ff, fr = net(xf).flatten(1).detach().requires_grad_(), net(xr).flatten(1)

    def everything():
        mmd2_unbiased_pooled(net(xf).flatten(1), net(xr).flatten(1), MULT)[0].backward()

    return {"net fwd x2": ms(lambda: (net(xf), net(xr))),
            "mmd fwd": ms(lambda: mmd2_unbiased_pooled(ff.detach(), fr, MULT)),
            "mmd fwd+bwd": ms(lambda: mmd2_unbiased_pooled(ff, fr, MULT)[0].backward()),
            "all fwd+bwd": ms(everything)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("vector", "image"), default="vector")
    ap.add_argument("--shape", type=int, nargs="+", default=[2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--draws", type=int, default=5, help="iterations whose K networks are timed")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {}
    draw = []
    for it in range(a.draws):
        draw.append(ms(lambda it=it: draw_networks(a.kind, a.shape, a.K, 0, it), n=3))
        for net in draw_networks(a.kind, a.shape, a.K, 0, it):
            for name, v in time_network(net, a.shape, a.batch).items():
                rows.setdefault(name, []).append(v)
    print(f"{a.kind} {a.shape} batch {a.batch}, K = {a.K}: median ms per network over {a.draws * a.K}")
    for name, v in rows.items():
        m = statistics.median(v)
        print(f"  {name:12s} {m:7.2f}   (x K = {a.K * m:.1f} per update)")
    print(f"  draw K nets  {statistics.median(draw):7.2f}   per update")


if __name__ == "__main__":
    main()
