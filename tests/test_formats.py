"""Readers: every format to the same RawSample, with file:line sources and bad records as BadSample."""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minimind_v.data.formats import BadSample, JsonArrayReader, JsonlReader, ParquetReader, open_dataset
from minimind_v.errors import UserError

UPSTREAM = {"conversations": [{"role": "user", "content": "<image>\n<image>\nsame?"},
                              {"role": "assistant", "content": "no"}], "image": "a.jpg, b.jpg"}
LLAVA = {"id": "1", "image": "coco/x.jpg", "conversations": [
    {"from": "system", "value": "Be kind."}, {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a dog"}]}
EXPECTED_LLAVA = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "<image>\nwhat?"},
                  {"role": "assistant", "content": "a dog"}]


def test_upstream_jsonl_with_blank_and_broken_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(UPSTREAM), "", "{not json", json.dumps({"conversations": []}), json.dumps(LLAVA),
             json.dumps({"text": "plain"})]
    path.write_text("\r\n".join(lines))  # Windows line ends, no final newline
    reader = open_dataset(path)
    assert isinstance(reader, JsonlReader) and len(reader) == 5
    assert reader[0].images == ["a.jpg", "b.jpg"] and reader[0].source == f"{path}:1"
    with pytest.raises(BadSample, match=r"train.jsonl:3: bad_json"):
        reader[1]
    with pytest.raises(BadSample, match=r":4: bad_record"):
        reader[2]
    assert reader[3].conversations == EXPECTED_LLAVA and reader[3].images == ["coco/x.jpg"]
    assert reader[4].text == "plain" and reader[4].source.endswith(":6")
    clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives
    assert clone[3].conversations == EXPECTED_LLAVA


def test_llava_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([LLAVA, {**LLAVA, "image": ["p.png", "q.png"]}, {"nope": 1}], indent=2))
    reader = open_dataset(path, tmp_path)
    assert isinstance(reader, JsonArrayReader) and len(reader) == 3
    assert reader[0].conversations == EXPECTED_LLAVA and reader.source(0) == f"{path}:2"
    lines = path.read_text().splitlines()
    assert lines[int(reader.source(1).rsplit(":", 1)[1]) - 1].strip() == "{"
    assert reader[1].images == ["p.png", "q.png"]
    with pytest.raises(BadSample, match="bad_record"):
        reader[2]
    path.write_text('[{"a": 1},\n {"b": ]')
    with pytest.raises(UserError, match=r"llava.json:2"):
        open_dataset(path)


def test_parquet_string_or_list_conversations_and_bytes(tmp_path):
    path = tmp_path / "d.parquet"
    convs = [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "ho"}]
    table = pa.table({"conversations": [json.dumps(convs)] * 5, "image_bytes": [b"\x89PNG"] * 5})
    pq.write_table(table, path, row_group_size=2)
    reader = open_dataset(path)
    assert isinstance(reader, ParquetReader) and len(reader) == 5
    assert reader[4].conversations == convs and reader[4].images == [b"\x89PNG"]
    assert reader[3].source == f"{path}:row 3"
    listed = pa.table({"conversations": [convs, convs], "image_bytes": [[b"1", b"2"], []]})
    pq.write_table(listed, path)
    reader = pickle.loads(pickle.dumps(open_dataset(path)))
    assert reader[0].images == [b"1", b"2"] and reader[1].images == [] and reader[1].conversations == convs
    pq.write_table(pa.table({"x": [1]}), path)
    with pytest.raises(UserError, match="no 'conversations'"):
        open_dataset(path)


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"role": "robot", "content": "x"}]}, "bad_roles"),
    ({"conversations": [{"role": "user"}]}, "bad_record"),
    ({"conversations": "[{"}, "bad_json"),
    ({"conversations": [{"role": "user", "content": "x"}], "image": 3}, "bad_record"),
    ([1, 2], "bad_record"),
])
def test_malformed_records(tmp_path, record, reason):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(BadSample) as err:
        open_dataset(path)[0]
    assert err.value.reason == reason and err.value.source == f"{path}:1"


def test_image_folder_defaults_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(UPSTREAM) + "\n")
    assert open_dataset(path).images_dir == tmp_path
    (tmp_path / "images").mkdir()
    assert open_dataset(path).images_dir == tmp_path / "images"
    with pytest.raises(UserError, match="no such folder"):
        open_dataset(path, tmp_path / "elsewhere")
    with pytest.raises(UserError, match="no such file"):
        open_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown format"):
        open_dataset(tmp_path / "t.csv")
