from quanta.kv.block_pool import BlockHash, BlockPool, KVBlock, hash_block
from quanta.kv.manager import KVCacheManager

__all__ = ["BlockHash", "BlockPool", "KVBlock", "KVCacheManager", "hash_block"]
