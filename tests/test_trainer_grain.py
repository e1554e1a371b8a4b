"""The trainer with a loader of another library: a grain `DataLoader` over our packed rows, resumed exactly."""

import jax
import numpy as np
import pytest

from vishwam.config import ModelConfig, TrainConfig
from vishwam.data import PackedRows, Texts, default_corpus, tokenize_source
from vishwam.model import VishwamAI
from vishwam.pipeline import VishwamAIPipeline
from vishwam.tokenizer import VishwamAITokenizer
from vishwam.train import load_metrics
from vishwam.train.trainer import RunConfig, VishwamAITrainer, load_run_state

gp = pytest.importorskip("grain.python")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grain")
    documents = default_corpus()[:24]
    tokenizer = VishwamAITokenizer.train(documents, folder / "tokenizer.model", vocab_size=400,
                                         hard_vocab_limit=False, input_kind="documents")
    rows = PackedRows(tokenize_source(Texts(documents), tokenizer), seq_len=32)
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)
    train_config = TrainConfig(batch_size=4, seq_len=32, total_steps=6, warmup_steps=1, learning_rate=2e-3)
    return tokenizer, rows, config, train_config


def _loader(rows: PackedRows):
    sampler = gp.IndexSampler(num_records=rows.num_rows, shard_options=gp.NoSharding(), shuffle=True,
                              num_epochs=None, seed=7)
    # PackedRows is a grain data source itself (len, getitem, a repr grain checks on restore).
    return gp.DataLoader(data_source=rows, sampler=sampler,
                         operations=[gp.Batch(batch_size=4, drop_remainder=True)], worker_count=0)


def _train(setup, run_dir, max_steps: int):
    tokenizer, rows, config, train_config = setup
    pipeline = VishwamAIPipeline(VishwamAI(config, key=jax.random.key(0)), tokenizer)
    run = RunConfig(run_dir=str(run_dir), max_steps=max_steps, progress=False, mesh={"data": 1}, eval_every=0,
                    checkpoint_every=0)
    # The iterator, not the DataLoader: each iter(DataLoader) starts over, the iterator has get/set_state.
    return VishwamAITrainer(pipeline, train_config, iter(_loader(rows)), run=run).train()


def test_packed_rows_as_a_grain_source_give_the_rows_of_batch(setup):
    rows = setup[1]
    batch = rows.batch(np.array([5, 0]))
    for name in batch:
        np.testing.assert_array_equal(rows[5][name], batch[name][0])
        np.testing.assert_array_equal(rows[-len(rows)][name], batch[name][1])
    with pytest.raises(IndexError, match="out of range"):
        rows[len(rows)]
    loaded = next(iter(_loader(rows)))
    assert loaded["tokens"].shape == (4, 32) and loaded["loss_mask"].dtype == np.float32


def test_a_grain_dataloader_trains_and_resumes_bit_exactly(setup, tmp_path):
    whole = _train(setup, tmp_path / "whole", 6)
    first = _train(setup, tmp_path / "split", 3)
    assert first.step == 3
    _, meta = load_run_state(tmp_path / "split", 3)
    assert '"last_seen_indices"' in meta["data"]["get_state"]["bytes"]  # grain's own JSON state
    resumed = _train(setup, tmp_path / "split", 6)
    assert resumed.start_step == 3 and resumed.step == 6
    a = load_metrics(tmp_path / "whole" / "metrics.duckdb", names=["loss"])["loss"]
    b = load_metrics(tmp_path / "split" / "metrics.duckdb", names=["loss"])["loss"]
    np.testing.assert_array_equal(b[0], np.arange(1, 7))
    np.testing.assert_array_equal(b[1], a[1])
    leaves = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree.leaves(resumed.state.model)))
    ref = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree.leaves(whole.state.model)))
    assert len(leaves) == len(ref) > 10
    for x, y in zip(leaves, ref, strict=True):
        np.testing.assert_array_equal(x, y)
