"""Data: ``prepare.prepare`` (text -> token shards), ``shards`` (index + memmap reader), ``loader.ShardLoader``
(resumable), document readers in ``sources``."""
