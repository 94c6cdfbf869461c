"""The ``gqa-pallas`` command line (``flax_layers.cli``): generate and the demo."""
import json
import os

import numpy as np
import pytest

from flax_layers import generate
from tests.decoder_fixtures import hf_config, hf_tensors, write_checkpoint


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_generate_random_model(capsys):
  from flax_layers.cli import main
  assert main(["generate", "--max-new-tokens", "5", "--batch", "2", "--json", "--no-warmup"]) == 0
  captured = capsys.readouterr()
  rows = json.loads(captured.out)  # stdout is the JSON alone
  assert len(rows) == 2 and all(len(r["new_ids"]) == 5 for r in rows)
  err = captured.err.strip().splitlines()
  assert "tokens/s" in err[-1] and "10 new tokens in all (2 rows)" in err[-1]
  assert any(line.startswith("compiling and running the first call") for line in err)


def test_cli_help_shows_defaults(capsys):
  from flax_layers.cli import main
  with pytest.raises(SystemExit):
    main(["generate", "--help"])
  out = capsys.readouterr().out
  assert "(default: 32)" in out and "(default: auto)" in out


def test_cli_generate_checkpoint_with_tokenizer(tiny, tmp_path, capsys):
  tokenizers = pytest.importorskip("tokenizers")
  from flax_layers.cli import main
  config, params = tiny
  path = write_checkpoint(tmp_path, hf_config(eos_token_id=None), hf_tensors(params, config))
  vocab = {f"w{i}": i for i in range(64)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  assert main(["generate", "--checkpoint", str(path), "--prompt", "w1 w2 w3",
               "--max-new-tokens", "4", "--no-warmup"]) == 0
  out = capsys.readouterr().out
  assert "[0] prompt ids: 1 2 3" in out and "[0] text: w" in out and "tokens/s" in out
  # Token ids agree with the Python API.
  assert main(["generate", "--checkpoint", str(path), "--prompt-ids", "1 2 3",
               "--max-new-tokens", "4", "--json", "--no-warmup"]) == 0
  row = json.loads(capsys.readouterr().out)[0]
  expected, _ = generate(config, params, np.array([[1, 2, 3]], np.int32), np.array([3]), 4,
                         implementation="xla")
  assert row["new_ids"] == np.asarray(expected)[0].tolist()
  assert row["text"] == " ".join(f"w{i}" for i in row["new_ids"])


def test_cli_demo(capsys):
  """The README's main job (`make demo`), shortened."""
  from flax_layers.cli import main
  assert main(["demo", "--max-new-tokens", "6"]) == 0
  out = capsys.readouterr().out
  assert "max |kernel - reference|" in out and "tokens/s" in out
  assert "identical tokens" in out and "demo passed" in out


@pytest.mark.parametrize("argv,match", [
    (["generate", "--implementation", "xla", "--interpret"], "--interpret runs the Pallas"),
    (["generate", "--prompt-ids", "1 x 3", "--no-warmup"], "--prompt-ids takes integers"),
    (["generate", "--checkpoint", "/nonexistent/ckpt", "--no-warmup"], "/nonexistent/ckpt"),
    (["generate", "--prompt", "hello", "--no-warmup"], "--prompt needs a checkpoint"),
])
def test_cli_user_errors_are_one_line_with_status_2(argv, match, capsys):
  from flax_layers.cli import main
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("gqa-pallas: error: ") and match in err[-1]
  assert not any("Traceback" in line for line in err)


def test_cli_broken_checkpoint_config_is_one_line(tmp_path, capsys):
  from flax_layers.cli import main
  (tmp_path / "config.json").write_text("{not json")
  assert main(["generate", "--checkpoint", str(tmp_path), "--no-warmup"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert "config.json" in err[-1] and err[-1].startswith("gqa-pallas: error: ")
