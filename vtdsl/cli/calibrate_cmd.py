"""`vtdsl calibrate`: measure this machine for the latency model (`check --device`)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, guarded


@click.command("calibrate")
@click.option("--name", default=None, help="Profile name to save under (default: the target, cpu or cuda).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="What to measure.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="torch threads while measuring the CPU (default: torch's); match how you run models.")
@click.option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True, help="Timed repeats per probe.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the profile here instead of the profile directory.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def calibrate_(name: str | None, target: str, threads: int | None, repeats: int, output: Path | None,
               as_json: bool) -> None:
    """Measure peak FLOP/s, attention FLOP/s, memory bandwidth and per-layer dispatch time
    (about 10 seconds) and save a device profile that `vtdsl check --device NAME` uses.

    \b
    Example:
      vtdsl calibrate --threads 1
      vtdsl check policies/fastv.vt -m llava-1.5-7b --device cpu --batch 8
    """
    from rich.console import Console
    from rich.progress import Progress

    from ..cost.calibrate import PROBES, calibrate
    from ..cost.devices import save_profile

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"measuring {target}", total=len(PROBES))
        profile = calibrate(name or target, target=target, threads=threads, repeats=repeats,
                            on_probe=lambda probe: progress.advance(task))
    path = save_profile(profile, output)
    if as_json:
        emit_json({"path": str(path), **profile.to_json()})
        return
    click.echo(f"saved {path}")
    for dtype, peak in profile.peak_flops.items():
        attn, causal = profile.attention_flops.get(dtype), profile.causal_attention_flops.get(dtype)
        click.echo(f"  {dtype:9s} matmul {peak / 1e9:8.1f} GFLOP/s"
                   + (f", attention {attn / 1e9:8.1f} GFLOP/s" if attn else "")
                   + (f", causal prefill attention {causal / 1e9:8.1f} GFLOP/s" if causal else ""))
    click.echo(f"  bandwidth {profile.bandwidth / 1e9:.1f} GB/s, dispatch {1e6 * profile.layer_overhead:.0f} us per "
               f"LLM layer, {1e6 * profile.vit_overhead:.0f} us per ViT layer")


COMMANDS = [calibrate_]
