"""Training and evaluation data: sources, checks, preparation (README: "Data").

    records   one record's schema per stage: a raw row -> the normalised record, or BadRecord
    hub       which files a Hub configuration's split has (hf:NAME:CONFIG[:SPLIT])
    sources   one row iterator per source kind (JSON-lines byte ranges, table files) and the task plan
    prepare   one pass in parallel: parse, normalise, check, write Arrow shards; reports merged in order
    cache     prepared data sets keyed by their inputs, published atomically under a lock
    load      load_records: the cached entry if there is one, else prepare it; memory-mapped either way
    fingerprint   the keys of a run's inputs: the data (files, Hub configurations), the base model, the tokenizer
    example_data  the example corpus's generator (example/make_data.py; the tiny model's pretraining texts)

It imports settings (clara.config), errors, files and stages only; the MAX_LEN check
comes in from above as a picklable recipe (clara.model.collate.LengthCheck) so that this package never imports
the tokenizer or model code.
"""

from clara.config import split_paths
from clara.data.load import load_records
from clara.data.records import (
    FEATURES,
    MAX_REPORTED_ERRORS,
    BadRecord,
    normalise,
    normalise_answer_record,
    normalise_stage1,
    parse_line,
    parse_row,
)
from clara.data.sources import iter_lines
from clara.errors import DataError

__all__ = [
    "FEATURES",
    "MAX_REPORTED_ERRORS",
    "BadRecord",
    "DataError",
    "iter_lines",
    "load_records",
    "normalise",
    "normalise_answer_record",
    "normalise_stage1",
    "parse_line",
    "parse_row",
    "split_paths",
]
