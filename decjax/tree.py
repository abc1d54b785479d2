"""Small pytree utilities shared by the staged model, optimizers and recovery rules."""

import jax
import jax.numpy as jnp

from decjax.types import PyTree


def stack(trees: list[PyTree]) -> PyTree:
    """Stacks structurally equal trees along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: splits the leading axis into a list of trees."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda leaf, i=i: leaf[i], tree) for i in range(n)]


def index(tree: PyTree, i) -> PyTree:
    """Slice ``i`` of every leaf's leading axis; ``i`` may be traced."""
    return jax.tree.map(lambda leaf: leaf[i], tree)


def set_index(tree: PyTree, i, value: PyTree) -> PyTree:
    """Returns ``tree`` with slice ``i`` of every leaf replaced by ``value``'s leaf."""
    return jax.tree.map(lambda leaf, v: leaf.at[i].set(v), tree, value)


def num_params(tree: PyTree) -> int:
    """Total number of scalar entries in ``tree``."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))
