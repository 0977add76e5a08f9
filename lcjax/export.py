"""A run's parameters as a Hugging Face model: `python -m lcjax.export --workdir=DIR --out=HFDIR`.

Exports the latest checkpoint's evaluation parameters (an outer loop's shared ones; DiPaCo's
path 0) with lcjax.hf.save_pretrained, in float32 unless --dtype says otherwise, with the
tokenizer files beside the run's data.tokenizer_path when the run used an hf tokenizer.
"""
import pathlib
import sys

from absl import flags

from lcjax import cli


def export(workdir, out, *, dtype: str = "float32") -> str:
  """Writes the run in `workdir` to `out`; returns a one-line summary."""
  from lcjax import hf
  from lcjax import sample as sample_lib
  with sample_lib.workdir_params(workdir) as (prepared, params):
    data = prepared.config.data
    tokenizer = pathlib.Path(data.tokenizer_path).parent if data.tokenizer == "hf" else None
    hf.save_pretrained(out, prepared.model_cfg, params, tokenizer_from=tokenizer, dtype=dtype)
  return (f"[lcjax] wrote {out}: {prepared.model_cfg.param_count():,} parameters in {dtype}"
          + (f", tokenizer from {tokenizer}" if tokenizer else
             f" (data.tokenizer={data.tokenizer!r}: no Hugging Face tokenizer to copy)"))


def _main(argv):
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "directory of a training run", flag_values=fv)
  flags.DEFINE_string("out", None, "new (or empty) directory for the Hugging Face model",
                      flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "dtype of the saved weights", flag_values=fv)
  cli.parse_flags(fv, argv, required=("workdir", "out"), doc=__doc__)
  print(export(fv.workdir, fv.out, dtype=fv.dtype))


def main(argv=None) -> int:
  return cli.run(_main, sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
