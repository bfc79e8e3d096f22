"""The parameters the generated kernels share, by name (``signature``): the streamed tensors and outputs, the tile
lists, the row terms, the sizes, the block sizes and a block's run-time sizes. ``kernels`` adds each kernel's own."""

from __future__ import annotations

from .signature import Param, constexpr, constexprs, group, tensor, value

#: A block's run-time sizes (``KernelSource.block``): offsets, rows and tile counts
BLOCK_PARAMS = ["Q_OFF", "K_OFF", "Q_EXT", "K_EXT", "TILES_Q", "TILES_K"]


def run_params(*kinds: str) -> list[Param]:
    """The ``{kind}_RUN`` constexprs of a kernel's lists (False: indices loaded in the loop)."""
    return [constexpr(f"{kind}_RUN", "False") for kind in kinds]


def tile_list(kind: str) -> Param:
    """A tile list (``FULL``, ``PART``, ``T_FULL``, ``T_PART``) as one group: its counts, entries and row width."""
    return group(kind, f"{kind}_N", f"{kind}_I", f"{kind.lower()}_w")


#: The forward's and the dQ kernel's streamed tensors and outputs; the backward kernels' row terms (the lse in log2
#: units and delta, with their shared strides)
Q, K, V = tensor("Q", "sq_b", "sq_h", "sq_n"), tensor("K", "sk_b", "sk_h", "sk_n"), tensor("V", "sv_b", "sv_h", "sv_n")
FWD_OUT = [tensor("O", "so_b", "so_h", "so_n", "so_s"), tensor("LSE", "sl_b", "sl_h", "sl_s")]
ROW_TERMS = group("ROW_TERMS", "LSE2", "DELTA", "sl_b", "sl_h")
#: The scale, and the query heads per K/V head with the head dims of q and k and of v, as one group
SIZES = [value("scale"), group("HEADS", "GROUP", "D", "DV")]
BLOCKS = constexprs("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "DOT")

#: A kernel whose grid's second axis counts batch entries x heads: the launch's first program there. CUDA launches
#: at most 65,535 programs along that axis, so a larger launch runs in parts (``kernel_launch.launch_kernel``), each
#: part from its own offset; one launch (offset 0, folded away) is the usual case.
GRID_Y0 = constexpr("GRID_Y0", "0")


def grid_y(what: str) -> str:
    """The line that reads this program's place along the grid's second axis into ``what``, past the part's offset."""
    return f"{what} = tl.program_id(1) + GRID_Y0  # (GRID_Y0: a launch past 65,535 programs here runs in parts)"
