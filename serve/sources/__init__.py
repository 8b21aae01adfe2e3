"""Remote checkpoint sources (s3://, hf://, https://) fetched into a local cache: one module per concern.

address.py     a checkpoint string parsed into scheme, bucket / repo / host, path, revision
allow.py       allowed_sources: which remote sources may be fetched at all (empty: none)
cache.py       the content-addressed cache: entries by sha256, refs, partial downloads, locks, size cap
transfer.py    one object written to a partial file: resumed at its size, retried with backoff, size-capped
web.py         HTTP(S) GETs and HEADs: redirects (https never downgraded, credentials kept to their host), Range
https.py       https:// sources (a sha256 is required)
s3.py          s3:// sources through boto3 (AWS or any S3-compatible store)
hf.py          hf:// sources: one file, or a model folder, from the Hugging Face Hub's file API
resolver.py    SourceSettings and Resolver: a checkpoint string -> a local file or folder in the cache
"""
