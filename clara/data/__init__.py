"""Training and evaluation data: sources, checks, preparation (README: "Data").

    spec      a data setting read into its sources (JSON-lines files, a Hub configuration): the one place
              that knows the hf:NAME:CONFIG[:SPLIT] form; standard library only
    records   one record's schema per stage: a raw row -> the normalised record, or BadRecord
    hub       which files a Hub configuration's split has
    sources   one row iterator per source kind (JSON-lines byte ranges, table files) and the task plan
    prepare   one pass in parallel: parse, normalise, check, write Arrow shards; reports merged in order
    cache     prepared data sets keyed by their inputs, published atomically under a lock
    load      load_records: the cached entry if there is one, else prepare it; memory-mapped either way
    fingerprint   the keys of a run's inputs: the data (files, Hub configurations), the base model, the tokenizer
    example_data  the example corpus's generator (example/make_data.py; the tiny model's pretraining texts)

The package's face imports nothing: `import clara.data.spec` stays light for the launchers' check. It imports
settings (clara.config), errors, files and stages only; the MAX_LEN check
comes in from above as a picklable recipe (clara.model.collate.LengthCheck) so that this package never imports
the tokenizer or model code.
"""
