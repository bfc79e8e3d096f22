"""A Wan and a CogVideoX video transformer sharded over 2 processes (gloo on CPU: no GPU needed) with
attnc's 3-D window in every self-attention, each against the same model in one process. Wan is split
where its _cp_plan says; CogVideoX (no _cp_plan) has its video tokens split and its text tokens on every
rank.

    python docs/examples/wan_context_parallel.py

On GPUs: one process per device (torchrun), init_process_group("nccl"), the model and latent on
the rank's device; the apply() call is the same.
"""

import os

import diffusers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig

from attnc.integrations import diffusers as attnc_diffusers


def randomized(model):
    """Random weights (the output projections start at zero), for inference."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def tiny_wan():
    torch.manual_seed(0)
    return randomized(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32))


def inputs():
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 4, 8, 6, generator=g)  # [B, C, frames, H, W] -> a 4 x 4 x 3 token grid
    return latent, torch.tensor([500]), torch.randn(1, 5, 8, generator=g)


def tiny_cogvideox():
    torch.manual_seed(0)
    return randomized(diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_width=6, sample_height=8, sample_frames=13, patch_size=2,
        max_text_seq_length=5))


def cogvideox_inputs():
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(1, 4, 4, 8, 6, generator=g)  # [B, frames, C, H, W] -> a 4 x 4 x 3 token grid
    return latent, torch.randn(1, 5, 8, generator=g), torch.tensor([500])


def run(make, args, parallel_config=None):
    model = make()
    handle = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=(3, 3, 3),
                                   parallel_config=parallel_config)
    with torch.no_grad():
        out = model(*args(), return_dict=False)[0]
    sent = handle.parallel.last_comm_bytes if handle.parallel is not None else 0
    handle.remove()
    return out, sent


def worker(rank, world):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, make, args in (("Wan", tiny_wan, inputs), ("CogVideoX", tiny_cogvideox, cogvideox_inputs)):
        out, sent = run(make, args, ContextParallelConfig(ring_degree=world))
        if rank == 0:
            one, _ = run(make, args)
            print(f"{name}: {world} ranks vs one process: max |difference| {(out - one).abs().max().item():.2e}; "
                  f"rank 0 sent {sent} bytes in the last attention")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2,), nprocs=2)
