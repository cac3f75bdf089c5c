"""Global plan for an offline batch (BatchLLM, arXiv 2412.03594): a prefix tree over every prompt's
chained block hashes (the prefix cache's own keys), groups of requests that share a prefix, the order to
run them in, and the exact optimum of prefill tokens a prefix cache could save on the batch.

An LRU cache fed in arrival order evicts shared prefixes before their users come; run in the plan's
order (siblings of the tree back to back), every distinct block needs computing once. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quanta.kv.block_pool import BlockHash, hash_block

# A deeper shared node starts its own group only if it extends the group's prefix by at least this share
# of its length: a block or two that siblings happen to share (BatchLLM's "flattening") is not worth
# splitting a group whose members share a long prefix.
FLATTEN = 0.5


@dataclass(slots=True, eq=False)
class _Node:
    """A node of a radix tree over hash chains: the edge above it covers positions [start, depth) of
    `key`, the hash chain of the prompt that created it (all chains through the node agree there)."""

    depth: int
    key: Sequence[BlockHash]
    start: int
    count: int = 0  # prompts through or ending at this node
    children: dict[BlockHash, _Node] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # prompts whose reusable blocks end here


@dataclass(slots=True)
class PlanGroup:
    members: list[int]  # prompt indexes, in run order (depth first: siblings share)
    prefix_blocks: int  # full blocks every member shares (0: a request sharing nothing)
    prefix_hash: BlockHash | None  # hash of the last shared block: the group's key in the prefix cache
    decode_ratio: float  # expected decode tokens over prompt tokens, summed over members


@dataclass(slots=True)
class BatchPlan:
    groups: list[PlanGroup]  # in run order
    block_size: int
    total_prompt_tokens: int
    optimal_saved_tokens: int  # prompt tokens an ideal prefix cache serves: all but distinct blocks

    @property
    def order(self) -> list[int]:
        return [i for g in self.groups for i in g.members]

    @property
    def optimal_saved_fraction(self) -> float:
        return self.optimal_saved_tokens / self.total_prompt_tokens if self.total_prompt_tokens else 0.0


def reusable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Full blocks of a prompt that the prefix cache can serve: it always leaves one token to compute."""
    return max(num_prompt_tokens - 1, 0) // block_size


def chain_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), algo: str = "sha256"
) -> list[BlockHash]:
    """The prefix cache's keys of a prompt's reusable blocks (as KVCacheManager.block_hashes chains them,
    with its hash algorithm)."""
    out: list[BlockHash] = []
    for i in range(reusable_blocks(len(token_ids), block_size)):
        parent = out[-1] if out else None
        block = token_ids[i * block_size : (i + 1) * block_size]
        out.append(hash_block(parent, block, extra_keys if i == 0 else (), algo))
    return out


def _insert(root: _Node, i: int, h: Sequence[BlockHash]) -> None:
    node, pos, n = root, 0, len(h)
    node.count += 1
    while pos < n:
        child = node.children.get(h[pos])
        if child is None:
            node.children[h[pos]] = _Node(n, h, pos, 1, ends=[i])
            return
        k = pos
        while k < child.depth and k < n and child.key[k] == h[k]:
            k += 1
        if k < child.depth:  # diverges (or ends) inside the edge: split it at k
            mid = _Node(k, child.key, child.start, child.count, {child.key[k]: child})
            child.start = k
            node.children[h[pos]] = mid
            child = mid
        child.count += 1
        node, pos = child, k
    node.ends.append(i)


def plan_batch(
    hashes: Sequence[Sequence[BlockHash]],
    prompt_lens: Sequence[int],
    block_size: int,
    expected_decode: Sequence[float] | None = None,
    group_order: str = "ratio",
    first_groups: frozenset[BlockHash] = frozenset(),
) -> BatchPlan:
    """Plan a batch from each prompt's reusable block hashes (`chain_hashes`).

    Groups: each prompt joins the deepest node of the tree that it shares with another prompt (flattened,
    see FLATTEN); prompts sharing nothing run alone. Inside a group members run depth first. Groups run
    by decode/prompt ratio, highest first (BatchLLM: decode-heavy work starts early and later prefill
    fills the batches), ties and `group_order="trie"` in depth-first order; groups whose prefix hash is in
    `first_groups` (already running: their prefix is held) go before all others."""
    assert len(hashes) == len(prompt_lens)
    assert group_order in ("ratio", "trie"), group_order
    root = _Node(0, (), 0)
    for i, h in enumerate(hashes):
        assert len(h) <= reusable_blocks(prompt_lens[i], block_size)
        _insert(root, i, h)
    groups: dict[object, PlanGroup] = {}
    distinct = 0
    # Depth first, children in order of first appearance; each entry carries the group anchor above it.
    stack: list[tuple[_Node, _Node | None]] = [(root, None)]
    while stack:
        node, anchor = stack.pop()
        distinct += node.depth - node.start
        shared = node.count >= 2 and node.depth > 0
        if shared and (anchor is None or node.depth - anchor.depth >= max(1, FLATTEN * anchor.depth)):
            anchor = node
        for i in node.ends:
            if anchor is None:  # shares no block with any other prompt
                groups[("solo", i)] = PlanGroup([i], 0, None, 0.0)
            else:
                g = groups.get(anchor)
                if g is None:
                    g = groups[anchor] = PlanGroup([], anchor.depth, anchor.key[anchor.depth - 1], 0.0)
                g.members.append(i)
        stack.extend((c, anchor) for c in reversed(list(node.children.values())))
    out = list(groups.values())  # depth-first order of each group's first member
    for g in out:
        prompt = sum(prompt_lens[i] for i in g.members)
        decode = sum(expected_decode[i] for i in g.members) if expected_decode is not None else 0.0
        g.decode_ratio = decode / max(prompt, 1)
    if group_order == "ratio":
        out.sort(key=lambda g: -g.decode_ratio)  # stable: ties stay depth first
    if first_groups:
        out.sort(key=lambda g: g.prefix_hash not in first_groups)
    total = sum(prompt_lens)
    saved = (sum(len(h) for h in hashes) - distinct) * block_size
    assert sorted(i for g in out for i in g.members) == list(range(len(hashes)))
    return BatchPlan(out, block_size, total, saved)


def plan_prompts(
    prompts: Sequence[Sequence[int]],
    block_size: int = 16,
    expected_decode: Sequence[float] | None = None,
    group_order: str = "ratio",
) -> BatchPlan:
    """Plan token-id prompts (no cache salt)."""
    return plan_batch(
        [chain_hashes(p, block_size) for p in prompts],
        [len(p) for p in prompts],
        block_size,
        expected_decode,
        group_order,
    )
