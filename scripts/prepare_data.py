"""Tokenizes a text or JSONL corpus once into ArrayRecord shards that training reads by record
(data.source="arrayrecord", data.paths=DIR), with no tokenizing at run time:

  python scripts/prepare_data.py --input='corpus/**/*.txt' --output=/data/corpus_bytes
  python scripts/prepare_data.py --input='dump/*.jsonl' --output=/data/corpus_llama3 \
    --tokenizer=hf --tokenizer_path=/models/llama3/tokenizer.json
  python scripts/prepare_data.py --input=stdlib --output=/tmp/stdlib_ar   # the default corpus

The train/held-out split is the text source's (lcjax/data/sources.py: by file hash, or by
document for JSONL; --eval_input fixes held-out files instead), so training on DIR gives exactly
the batches that training on the text gives. DIR gets index.json (tokenizer identity, document
and token counts), {train,eval}-*.array_record and {train,eval}-lengths.npy
(lcjax/data/arrayrecord.py).
"""
from absl import app, flags

_INPUT = flags.DEFINE_string("input", None, "comma-separated globs of .txt/.py/... files or of "
                             ".jsonl files; 'stdlib' = this Python's standard library")
_OUTPUT = flags.DEFINE_string("output", None, "an empty (or new) directory for the shards")
_EVAL_INPUT = flags.DEFINE_string("eval_input", "", "globs of held-out files ('' = split --input)")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.05, "held-out share when splitting")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL: the field holding the text")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "bytes", ["bytes", "hf", "sentencepiece"],
                               "the tokenizer (the run must name the same one)")
_TOKENIZER_PATH = flags.DEFINE_string("tokenizer_path", "", "hf tokenizer.json or SentencePiece "
                                      ".model (local)")
_DEDUPE = flags.DEFINE_bool("dedupe", False, "keep only the first of documents with the same "
                            "text (data.dedupe)")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", 65536, "documents per ArrayRecord file")
flags.mark_flags_as_required(["input", "output"])


def data_config():
  """The data config whose text source is --input (the keys training would use)."""
  from lcjax import config as config_lib
  c = config_lib.base_config().data
  globs = [g.strip() for g in _INPUT.value.split(",") if g.strip()]
  if _INPUT.value == "stdlib":
    c.source = "stdlib"
  else:
    c.source = "jsonl" if all(g.endswith(".jsonl") for g in globs) else "text"
    c.paths = _INPUT.value
  c.update(eval_paths=_EVAL_INPUT.value, eval_fraction=_EVAL_FRACTION.value,
           text_field=_TEXT_FIELD.value, tokenizer=_TOKENIZER.value,
           tokenizer_path=_TOKENIZER_PATH.value, dedupe=_DEDUPE.value)
  return c


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lcjax.data import arrayrecord, sources, tokenizers
  c = data_config()
  try:
    tokenizer = tokenizers.make_tokenizer(c)
    corpus = sources.scan(c, len)  # where each document is; write() tokenizes and counts
    index = arrayrecord.write(_OUTPUT.value, corpus, tokenizer, tokenizers.identity(c, tokenizer),
                              docs_per_shard=_DOCS_PER_SHARD.value)
  except ValueError as e:
    raise SystemExit(f"prepare_data.py: error: {e}") from None
  for split, entry in index["splits"].items():
    print(f"{split}: {entry['documents']} documents, {entry['tokens']} tokens in "
          f"{len(entry['shards'])} shards")
  print(f"train with --config.data.source=arrayrecord --config.data.paths={_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
