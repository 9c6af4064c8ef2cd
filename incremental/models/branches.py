"""A backbone of parallel branches whose features are concatenated (DER, MEMO, FOSTER).

Params are `{'shared': ..., 'branch_0': ..., 'branch_1': ...}` (`shared` only when set), the layout
that `surgery.add_branch` grows by one branch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Branches(nn.Module):
    """`num_branches` copies of `branch` (optionally after `shared` layers), features concatenated.

    Branches before `frozen`, and `shared` when `freeze_shared`, always run in inference mode: their
    BatchNorm uses and keeps its running statistics, so a frozen branch computes exactly what it
    computed when it was trained.
    """

    branch: nn.Module
    num_branches: int
    frozen: int = 0
    shared: nn.Module | None = None
    freeze_shared: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns features (B, num_branches * D), branch 0's first."""
        if self.num_branches < 1:
            raise ValueError(f"Branches needs at least one branch, got {self.num_branches}.")
        if self.shared is not None:
            x = self.shared(x, train=train and not self.freeze_shared)  # params: 'shared'
        feats = [
            self.branch.clone(parent=self, name=f"branch_{i}")(x, train=train and i >= self.frozen)
            for i in range(self.num_branches)
        ]
        return jnp.concatenate([f.astype(jnp.float32) for f in feats], axis=-1)
