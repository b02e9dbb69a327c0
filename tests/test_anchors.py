"""Offline anchors without a trainer: the streaming writer, the memory-mapped reader, `OfflineAnchors`, rank splits."""

import os
import stat

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from hf_sara import patch_model, routing_distributions
from hf_sara.distributed import full_parameters, rank_batches
from hf_sara.training.anchors import ANCHORS_FORMAT, AnchorIdentity, AnchorTable, OfflineAnchors
from hf_sara.training.anchors.file import AnchorFileWriter, MappedAnchorFile
from hf_sara.training.paired_data import ROW_COLUMN

from .testing_utils import tiny_model

METADATA = {"format": ANCHORS_FORMAT, "model": "tiny"}


def identity_of(model, tables: dict[str, AnchorTable], pooling: str = "all") -> AnchorIdentity:
    return AnchorIdentity.of(model, {name: table.identity(pooling) for name, table in tables.items()}, pooling)


def one_by_one(model, rows: Dataset) -> torch.Tensor:
    """The routing of each tokenized row, computed alone (no padding, no batch): an independent reference."""
    with torch.no_grad():
        return torch.cat([routing_distributions(model, torch.tensor([ids])) for ids in rows["input_ids"]])


def tokenized_rows(row_ids: list[int], seed: int = 0) -> Dataset:
    """Prepared anchors: random token ids of random lengths, with their global row ids."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (len(row_ids),), generator=generator).tolist()
    ids = [torch.randint(3, 128, (length,), generator=generator).tolist() for length in lengths]
    return Dataset.from_dict({"input_ids": ids, ROW_COLUMN: row_ids})


class TestAnchorFile:
    def test_rows_written_in_any_order_read_back_by_safetensors_and_by_the_map(self, tmp_path):
        path = tmp_path / "anchors.safetensors"
        values = torch.rand(10, 3, 5)
        shapes = {"a.distributions": ((10, 3, 5), torch.float32), "a.has_anchor": ((10,), torch.bool)}
        with AnchorFileWriter(path, shapes, METADATA) as writer:
            for rows in ([7, 2, 9], [0, 1], [5, 3]):
                writer.write("a.distributions", torch.tensor(rows), values[rows])
            writer.write("a.has_anchor", slice(None), torch.arange(10) != 4)
            writer.commit()
        expected = values.clone()
        expected[[4, 6, 8]] = 0.0  # never written: zeros
        loaded = load_file(str(path))
        torch.testing.assert_close(loaded["a.distributions"], expected, rtol=0, atol=0)
        assert loaded["a.has_anchor"].tolist() == [index != 4 for index in range(10)]
        mapped = MappedAnchorFile(path)
        assert mapped.metadata == METADATA
        torch.testing.assert_close(mapped.rows("a.distributions", torch.tensor([9, 0, 9])), expected[[9, 0, 9]])
        assert os.listdir(tmp_path) == ["anchors.safetensors"]  # no temporary file left

    def test_an_interrupted_write_leaves_nothing(self, tmp_path):
        path = tmp_path / "anchors.safetensors"
        with pytest.raises(KeyboardInterrupt):
            with AnchorFileWriter(path, {"a.distributions": ((4, 2, 2), torch.float32)}, METADATA) as writer:
                writer.write("a.distributions", torch.tensor([0]), torch.ones(1, 2, 2))
                raise KeyboardInterrupt
        assert os.listdir(tmp_path) == []

    def test_the_file_gets_the_permissions_of_the_umask(self, tmp_path):
        umask = os.umask(0o022)
        try:
            path = tmp_path / "anchors.safetensors"
            with AnchorFileWriter(path, {"a.distributions": ((1, 1, 1), torch.float32)}, METADATA) as writer:
                writer.commit()
        finally:
            os.umask(umask)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644

    @pytest.mark.parametrize(
        "damage, problem",
        [
            (lambda path: path.write_bytes(b""), "fewer than a header"),
            (lambda path: path.write_bytes(os.urandom(4096)), "header"),
            (lambda path: path.write_bytes(path.read_bytes()[:-100]), "does not fit"),
        ],
        ids=["empty", "random", "cut"],
    )
    def test_a_damaged_file_is_refused_with_its_path_and_the_fix(self, tmp_path, damage, problem):
        path = tmp_path / "anchors.safetensors"
        with AnchorFileWriter(path, {"a.distributions": ((8, 2, 4), torch.float32)}, METADATA) as writer:
            writer.commit()
        damage(path)
        with pytest.raises(ValueError, match=f"{path}.*{problem}.*If it is an anchors file hf_sara wrote.*remove it"):
            MappedAnchorFile(path)

    def test_a_folder_is_never_to_be_removed(self, tmp_path):
        # Was: "it is a directory ... remove it to recompute the anchors": that folder may hold the model and data.
        with pytest.raises(
            ValueError, match="is a folder, not an anchors file: point `sara_anchor_path` at a file"
        ) as error:
            MappedAnchorFile(tmp_path)
        assert "remove" not in str(error.value) and "delete" not in str(error.value)


class TestOfflineAnchors:
    def test_computed_anchors_equal_the_one_process_function_and_are_looked_up_by_global_row(self, tmp_path):
        model = patch_model(tiny_model("qwen3_moe"))
        # The train dataset has rows 0..9, three of them (3, 5, 8) without an anchor; the eval one rows 20..24.
        train_anchors = tokenized_rows([0, 1, 2, 4, 6, 7, 9])
        evaluation = tokenized_rows(list(range(20, 25)), seed=1)
        tables = {"train": AnchorTable(train_anchors, 0, 10), "eval": AnchorTable(evaluation, 20, 5)}
        path = tmp_path / "anchors.safetensors"
        model.eval()
        anchors, computed = OfflineAnchors.compute(model, tables, path, identity_of(model, tables), batch_size=3)
        assert computed == 12
        expected_train, expected_eval = one_by_one(model, train_anchors), one_by_one(model, evaluation)
        rows = torch.tensor([9, 22, 3, 0, 24, 6])
        targets, has_anchor = anchors.lookup(rows, (6, 4, 8))
        assert has_anchor.tolist() == [True, True, False, True, True, True]
        torch.testing.assert_close(targets[0], expected_train[6], rtol=0, atol=1e-6)
        torch.testing.assert_close(targets[1], expected_eval[2], rtol=0, atol=1e-6)
        assert targets[2].abs().sum() == 0
        torch.testing.assert_close(targets[3], expected_train[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(targets[4], expected_eval[4], rtol=0, atol=1e-6)
        torch.testing.assert_close(targets[5], expected_train[4], rtol=0, atol=1e-6)
        assert anchors.table("train").shape == (10, 4, 8)

    def test_load_checks_the_metadata_and_the_rows(self, tmp_path):
        model = patch_model(tiny_model("qwen3_moe"))
        path = tmp_path / "anchors.safetensors"
        tables = {"train": AnchorTable(tokenized_rows(list(range(4))), 0, 4)}
        identity = identity_of(model, tables)
        OfflineAnchors.compute(model, tables, path, identity)
        OfflineAnchors.load(path, identity, tables)
        renamed = AnchorIdentity(**{**vars(identity), "model": "./another/path"})
        OfflineAnchors.load(path, renamed, tables)  # the name informs
        with pytest.raises(ValueError, match="pooling is 'all' there but 'prompt' here"):
            OfflineAnchors.load(path, AnchorIdentity(**{**vars(identity), "pooling": "prompt"}), tables)
        longer = {"train": AnchorTable(tokenized_rows(list(range(4))), 0, 5)}
        with pytest.raises(ValueError, match="lacks the tensor 'train.distributions' of 5 rows"):
            OfflineAnchors.load(path, AnchorIdentity(**{**vars(identity), "datasets": {}}), longer)

    def test_raw_text_is_refused(self, tmp_path):
        model = patch_model(tiny_model("qwen3_moe"))
        table = AnchorTable(Dataset.from_dict({"text": ["a"], ROW_COLUMN: [0]}), 0, 1)
        identity = AnchorIdentity("checksum", 4, 8, "all")
        with pytest.raises(ValueError, match="no `input_ids` column"):
            OfflineAnchors.compute(model, {"train": table}, tmp_path / "anchors.safetensors", identity)

    def test_several_ranks_need_a_gather(self, tmp_path):
        model = patch_model(tiny_model("qwen3_moe"))
        table = AnchorTable(tokenized_rows([0, 1]), 0, 2)
        identity = identity_of(model, {"train": table})
        with pytest.raises(ValueError, match="needs a `gather`"):
            OfflineAnchors.compute(model, {"train": table}, tmp_path / "a.safetensors", identity, num_processes=2)


@pytest.mark.parametrize("num_batches", [0, 1, 5, 8, 9])
@pytest.mark.parametrize("num_processes", [1, 2, 3, 16])
def test_rank_batches_deal_every_batch_once_in_equal_rounds(num_batches, num_processes):
    dealt = [rank_batches(num_batches, num_processes, rank) for rank in range(num_processes)]
    assert len({len(batches) for batches in dealt}) == 1  # the same number of forwards on every rank
    real = sorted(batch for batches in dealt for batch in batches if batch is not None)
    assert real == list(range(num_batches))
    counts = [sum(batch is not None for batch in batches) for batches in dealt]
    assert max(counts) - min(counts) <= 1


def test_full_parameters_yields_plain_parameters_unchanged():
    layer = torch.nn.Linear(3, 2)
    with full_parameters(list(layer.parameters())) as values:
        torch.testing.assert_close(values[0], layer.weight.detach())
        assert not values[0].requires_grad
