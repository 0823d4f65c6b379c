"""The OpenAI Batch job: JSONL requests in, one OpenAI Batch output line per request out.

Resumable after ``kill -9`` (the output is an append-only journal with a manifest), with bad
lines isolated, and sharded over processes. See docs/batch.md; the command is
``jaxsample batch`` (jaxsample.batch.command).
"""

from jaxsample.batch.job import JobConfig as JobConfig
from jaxsample.batch.job import run_job as run_job
from jaxsample.batch.journal import Journal as Journal
from jaxsample.batch.journal import JournalError as JournalError
from jaxsample.batch.manifest import ManifestError as ManifestError
from jaxsample.batch.merge import MergeError as MergeError
from jaxsample.batch.merge import merge_shards as merge_shards
from jaxsample.batch.reader import read_lines as read_lines
from jaxsample.batch.reader import shard_of as shard_of

__all__ = [
    "JobConfig",
    "Journal",
    "JournalError",
    "ManifestError",
    "MergeError",
    "merge_shards",
    "read_lines",
    "run_job",
    "shard_of",
]
