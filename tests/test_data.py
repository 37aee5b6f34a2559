"""Loading parallel text in every supported format, precise DataErrors, cached encoding and counted filters."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from nmtkit import data
from nmtkit.config import DataConfig
from nmtkit.data import DataError, iter_texts, load_split, sample_rows
from nmtkit.encoded import FilterReport, encode_split

BUNDLED = Path(__file__).parents[1] / "data" / "tatoeba-en-zh"


class CharTokenizer:
    """One piece per non-space character; counts encode calls so tests can see cache hits."""

    def __init__(self, fingerprint: str = "char-tokenizer-1") -> None:
        self.fingerprint = fingerprint
        self.calls = 0

    def _encode(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return [[4 + ord(c) % 1000 for c in text if not c.isspace()] for text in texts]

    encode_src = _encode
    encode_tgt = _encode


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pairs(records: list[tuple[str, str]]) -> list[dict]:
    return [{"translation": {"en": en, "zh": zh}, "attribution": f"#{i}"} for i, (en, zh) in enumerate(records)]


def cfg_for(path: Path | str, **overrides) -> DataConfig:
    return DataConfig(train=str(path), **overrides)


# ----------------------------------------------------------------------------- formats


def test_jsonl_translation_schema_gives_src_and_tgt_columns(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("Hello.", "你好。"), ("Thanks.", "谢谢。")]))
    ds = load_split(cfg_for(path), "train", cache)
    assert ds.column_names == ["src", "tgt"]
    assert ds[:] == {"src": ["Hello.", "Thanks."], "tgt": ["你好。", "谢谢。"]}


@pytest.mark.parametrize("name", ["train.jsonl", "train.tsv", "train.{lang}"])
def test_a_file_replaced_by_another_with_the_same_modification_time_is_read_again(tmp_path: Path, cache: Path, name: str) -> None:
    """`cp -p`, `rsync -a` and `tar x` keep a file's modification time, which is all `datasets` knows it by: the
    replaced file must not be served from the first one's cache."""
    def write(records: list[tuple[str, str]]) -> None:
        if name.endswith(".jsonl"):
            write_jsonl(tmp_path / name, pairs(records))
        elif name.endswith(".tsv"):
            (tmp_path / name).write_text("en\tzh\n" + "".join(f"{en}\t{zh}\n" for en, zh in records), encoding="utf-8")
        else:
            for i, lang in enumerate(("en", "zh")):
                (tmp_path / f"train.{lang}").write_text("".join(pair[i] + "\n" for pair in records), encoding="utf-8")

    write([("Hello.", "你好。"), ("Thanks.", "谢谢。")])
    files = sorted(tmp_path.glob(name.replace("{lang}", "*")))
    times = [f.stat().st_mtime_ns for f in files]
    assert load_split(cfg_for(tmp_path / name), "train", cache)["src"] == ["Hello.", "Thanks."]
    write([("Howdy.", "您好。"), ("Cheers.", "干杯。")])  # the same sizes in bytes, in place (the same inode)
    for f, t in zip(files, times, strict=True):
        os.utime(f, ns=(t, t))
    assert load_split(cfg_for(tmp_path / name), "train", cache)["src"] == ["Howdy.", "Cheers."]


def test_a_byte_order_mark_is_not_part_of_a_text_pairs_first_sentence(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.en").write_text("\ufeffHello.\nThanks.\n", encoding="utf-8")
    (tmp_path / "train.zh").write_text("\ufeff你好。\n谢谢。\n", encoding="utf-8")
    ds = load_split(cfg_for(tmp_path / "train.{lang}"), "train", cache)
    assert ds[0] == {"src": "Hello.", "tgt": "你好。"}


def test_a_changed_file_leaves_no_tables_of_what_it_was_in_the_cache(tmp_path: Path, cache: Path) -> None:
    """Each identity of a file gets its tables; the older ones (10M pairs: gigabytes) go when a newer is made."""
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("Hello.", "你好。")]))
    load_split(cfg_for(path), "train", cache)
    os.chmod(path, 0o600)  # a new change time, the same content
    load_split(cfg_for(path), "train", cache)
    write_jsonl(tmp_path / "other.jsonl", pairs([("Thanks.", "谢谢。")]))
    load_split(cfg_for(tmp_path / "other.jsonl"), "train", cache)
    assert len(list((cache / "files").iterdir())) == 2  # one per file


def test_language_keys_come_from_the_config(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("Hello.", "你好。")]))
    ds = load_split(cfg_for(path, src_lang="zh", tgt_lang="en"), "train", cache)
    assert ds[0] == {"src": "你好。", "tgt": "Hello."}


def test_flat_json_records_load_from_jsonl_and_json_array(tmp_path: Path, cache: Path) -> None:
    records = [{"en": "a b", "zh": "甲乙", "id": 1}, {"en": "c", "zh": "丙", "id": 2}]
    jsonl = write_jsonl(tmp_path / "flat.jsonl", records)
    array = tmp_path / "flat.json"
    array.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    for path in (jsonl, array):
        ds = load_split(cfg_for(path), "train", cache)
        assert ds[:] == {"src": ["a b", "c"], "tgt": ["甲乙", "丙"]}


def test_tsv_keeps_text_that_looks_like_missing_values_or_quotes(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text('zh\ten\tnote\n不适用\tNA\t1\n"引号"\t"quoted" text\t2\n空\tnull\t3\n', encoding="utf-8")
    ds = load_split(cfg_for(path), "train", cache)
    assert ds[:] == {"src": ["NA", '"quoted" text', "null"], "tgt": ["不适用", '"引号"', "空"]}


def test_csv_reads_quoted_fields_with_commas(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('en,zh\n"Yes, sir.",是，先生。\n42,四十二\n', encoding="utf-8")
    ds = load_split(cfg_for(path), "train", cache)
    assert ds[:] == {"src": ["Yes, sir.", "42"], "tgt": ["是，先生。", "四十二"]}


def test_text_pair_pattern_loads_line_aligned_files(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "train.zh").write_text("一\n二\n三\n", encoding="utf-8")
    ds = load_split(cfg_for(tmp_path / "train.{lang}"), "train", cache)
    assert ds.column_names == ["src", "tgt"]
    assert ds[:] == {"src": ["one", "two", "three"], "tgt": ["一", "二", "三"]}


def test_each_split_reads_its_own_config_key(tmp_path: Path, cache: Path) -> None:
    write_jsonl(tmp_path / "valid.jsonl", pairs([("v", "验")]))
    cfg = DataConfig(train="missing.jsonl", valid=str(tmp_path / "valid.jsonl"), test="missing.jsonl")
    assert load_split(cfg, "valid", cache)["src"][:] == ["v"]


def test_bundled_tatoeba_valid_split_loads(cache: Path) -> None:
    cfg = DataConfig(valid=str(BUNDLED / "valid.jsonl"))
    ds = load_split(cfg, "valid", cache)
    assert len(ds) == 788
    assert ds.column_names == ["src", "tgt"]
    assert all(isinstance(x, str) and x for x in ds[:5]["tgt"])


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_path_and_config_key(tmp_path: Path, cache: Path) -> None:
    cfg = DataConfig(valid=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"data\.valid: file not found: .*nope\.jsonl"):
        load_split(cfg, "valid", cache)


def test_missing_side_of_a_text_pair_names_the_file(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.en").write_text("one\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.train .*file not found: .*train\.zh"):
        load_split(cfg_for(tmp_path / "train.{lang}"), "train", cache)


def test_unsupported_extension_lists_the_formats(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.xml").write_text("<x/>")
    with pytest.raises(DataError, match=r"data\.train: .*unsupported file type '\.xml'.*\.jsonl"):
        load_split(cfg_for(tmp_path / "train.xml"), "train", cache)


def test_text_pair_with_different_line_counts_names_both_files_and_counts(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "train.zh").write_text("一\n二\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_split(cfg_for(tmp_path / "train.{lang}"), "train", cache)
    assert "train.en has 3 lines" in str(e.value) and "train.zh has 2" in str(e.value)


def test_missing_language_key_names_file_and_line(tmp_path: Path, cache: Path) -> None:
    records = pairs([("a", "甲"), ("b", "乙")]) + [{"translation": {"en": "c", "de": "c"}}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError) as e:
        load_split(cfg_for(path), "train", cache)
    message = str(e.value)
    assert "train.jsonl, line 3" in message
    assert "missing key 'translation.zh'" in message and "translation.en, translation.de" in message


def test_null_value_in_flat_record_is_named_as_null(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"en": "a", "zh": "甲"}, {"en": None, "zh": "乙"}])
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: 'en' is null, expected a string"):
        load_split(cfg_for(path), "train", cache)


def test_a_value_that_is_no_string_is_shown_shortened(tmp_path: Path, cache: Path) -> None:
    """A file of columns ({"en": [every sentence], ...}) must not print the whole column into the error."""
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"en": ["a sentence"] * 50_000, "zh": ["一句话"] * 50_000}), encoding="utf-8")
    with pytest.raises(DataError, match=r"'en' is list \['a sentence', .*\], expected a string") as e:
        load_split(cfg_for(path), "train", cache)
    assert len(str(e.value)) < 500


def test_language_absent_from_every_record_names_the_first_line(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"en": "a", "fr": "b"}])
    with pytest.raises(DataError, match=r"line 1: missing key 'zh' \(keys present: en, fr\).*data\.tgt_lang"):
        load_split(cfg_for(path), "train", cache)


def test_unparseable_json_line_names_file_and_line(tmp_path: Path, cache: Path, caplog) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("a", "甲"), ("b", "乙")]))
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"translation": {"en": "c", "zh": "丙"\n')
    with caplog.at_level("DEBUG"), pytest.raises(DataError, match=r"train\.jsonl, line 3: not valid JSON"):
        load_split(cfg_for(path), "train", cache)
    # the builder's own log line (its row numbers start at 0) would come before nmtkit's error and contradict it
    assert not [r for r in caplog.records if r.name.startswith("datasets.packaged_modules")]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_an_empty_data_path_says_what_the_split_is_for(split: str, cache: Path) -> None:
    with pytest.raises(DataError, match=rf"data\.{split} is empty: it names the pairs .*; fix the path in the config or pass --set data\.{split}=PATH"):
        load_split(DataConfig(**{split: ""}), split, cache)


@pytest.mark.parametrize(
    "files, config_path, where",
    [
        ({"train.jsonl": b'{"en": "a", "zh": "b"}\n\n{"en": "\xff", "zh": "b"}\n'}, "train.jsonl", "train.jsonl"),
        ({"train.tsv": b"en\tzh\na\tb\n\xff\tb\n"}, "train.tsv", "train.tsv"),
        ({"train.en": b"a\nb\nc\n", "train.zh": b"a\nb\n\xe4\xb8\n"}, "train.{lang}", "train.zh"),  # cut-off character
    ],
)
def test_invalid_utf8_names_file_and_line(
    tmp_path: Path, cache: Path, files: dict[str, bytes], config_path: str, where: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{re.escape(where)}, line 3: invalid UTF-8"):
        load_split(cfg_for(tmp_path / config_path), "train", cache)


def test_tsv_header_without_language_column_names_the_columns(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("en\tfr\na\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv, line 1: the header has no column 'zh' \(columns: en, fr\)"):
        load_split(cfg_for(path), "train", cache)


def test_tsv_row_with_extra_field_names_line_and_counts(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("en\tzh\na\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv, line 3: 3 fields, the header has 2"):
        load_split(cfg_for(path), "train", cache)


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        # a scored corpus under a header that names the languages only: pandas would take the first field for an
        # index and read zh -> score
        ("en\tzh\nhello\t你好\t0.9\nbye\t再见\t0.8\n", r"line 2: 3 fields, the header has 2; check for a stray tab"),
        # `bye<TAB>0.8` under `en zh score` leaves the score empty, not a language: it would read as the pair bye -> 0.8
        ("en\tzh\tscore\nhello\t你好\t0.9\nbye\t0.8\n", r"line 3: 2 fields, the header has 3; check for a missing tab"),
    ],
    ids=["every row a field more", "a row a field short in another column"],
)
def test_rows_that_do_not_match_the_header_are_refused_at_every_start_not_read_shifted(
    tmp_path: Path, cache: Path, text: str, refusal: str
) -> None:
    """Refused at the second start too: the first start's cached tables of the cut rows are not served."""
    path = tmp_path / "train.tsv"
    path.write_text(text, encoding="utf-8")
    for _ in range(2):
        with pytest.raises(DataError, match=r"train\.tsv, " + refusal):
            load_split(cfg_for(path), "train", cache)


def test_a_column_without_a_name_and_a_field_over_csvs_size_limit_still_load(tmp_path: Path, cache: Path) -> None:
    """A spreadsheet's trailing separator leaves a column without a name; csv's 131,072-character field limit is not
    nmtkit's (the empty cells send the file through the row scan, which reads every field)."""
    path = tmp_path / "train.csv"
    long = "a" * 150_000
    path.write_text(f"en,zh,\nhello,你好,\n{long},长,\n", encoding="utf-8")
    assert load_split(cfg_for(path), "train", cache)[:] == {"src": ["hello", long], "tgt": ["你好", "长"]}


def test_a_lone_surrogate_in_a_json_text_names_file_line_and_key(tmp_path: Path, cache: Path) -> None:
    """Valid JSON (an escape for half of an emoji, as text cut in the middle of one leaves it) but no UTF-8 text."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"translation": {"en": "ok", "zh": "好"}}\n{"translation": {"en": "bad \\ud83d", "zh": "坏"}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: 'translation\.en' holds a lone surrogate \('\\ud83d' at character 5\)"):
        load_split(cfg_for(path), "train", cache)


def test_an_empty_text_file_of_a_pair_says_it_is_empty(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.en").write_text("", encoding="utf-8")
    (tmp_path / "train.zh").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.en: the file is empty; fill it or point data\.train at other files"):
        load_split(cfg_for(tmp_path / "train.{lang}"), "train", cache)


def test_a_table_with_empty_cells_is_scanned_for_short_rows_once(tmp_path: Path, cache: Path, monkeypatch) -> None:
    """Empty cells send the file through the row scan (a missing tab reads as an empty cell); the file's cache folder
    remembers that its rows are whole, so later starts skip the scan."""
    path = tmp_path / "train.tsv"
    path.write_text("en\tzh\na\t\nb\tc\n", encoding="utf-8")
    first = load_split(cfg_for(path), "train", cache)

    def not_again(*args, **kwargs):
        raise AssertionError("the rows were scanned again")

    monkeypatch.setattr(data, "scan_table", not_again)
    assert load_split(cfg_for(path), "train", cache)[:] == first[:] == {"src": ["a", "b"], "tgt": ["", "c"]}


def test_a_tsv_row_with_a_quote_gets_no_hint_about_quotes(tmp_path: Path, cache: Path) -> None:
    """TSV is read without quoting: its quotes are text, and never open a field."""
    path = tmp_path / "train.tsv"
    path.write_text('en\tzh\na\tb\nHe said "hi\tx\ty\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv, line 3: 3 fields, the header has 2; check for a stray tab") as info:
        load_split(cfg_for(path), "train", cache)
    assert "a quote opened" not in str(info.value)


def test_csv_quote_that_never_closes_is_named_at_the_line_it_opens(tmp_path: Path, cache: Path) -> None:
    """csv reads on from an open quote to the end of the file: the error names the line the record starts on."""
    path = tmp_path / "train.csv"
    path.write_text('en,zh\nHello,你好\n"Bad quote,坏\nThanks,谢谢\nMore,更多\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv, lines 3-5, one record \(a quote opened there never closes\): 1 fields, the header has 2"):
        load_split(cfg_for(path), "train", cache)
    # a record over two lines (a quoted line break), closed, with a field too many
    path.write_text('en,zh\nHello,你好\n"two\nlines",a,b\nMore,更多\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv, lines 3-4, one record: 3 fields, the header has 2"):
        load_split(cfg_for(path), "train", cache)


# ----------------------------------------------------------------------------- encoding and filters


def test_encode_adds_int32_ids_and_lengths(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("ab c", "甲乙")]))
    ds, report = encode_split(load_split(cfg_for(path), "train", cache), CharTokenizer(), DataConfig(), "train")
    assert ds.features["src_ids"].feature.dtype == "int32" and ds.features["src_len"].dtype == "int32"
    row = ds[0]
    assert (row["src_len"], row["tgt_len"]) == (3, 2)
    assert row["src_ids"] == [4 + ord("a"), 4 + ord("b"), 4 + ord("c")]
    assert report == FilterReport("train", total=1, kept=1, empty=0, too_long=0, bad_ratio=0)


def test_training_tables_hold_ids_only_and_evaluation_tables_keep_the_reference_text(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("ab c", "甲乙"), ("", "甲")]))
    raw = load_split(cfg_for(path), "train", cache)
    train, _ = encode_split(raw, CharTokenizer(), DataConfig(), "train", apply_filters=True)
    assert sorted(train.column_names) == ["src_ids", "src_len", "tgt_ids", "tgt_len"]
    evaluation, _ = encode_split(raw, CharTokenizer(), DataConfig(), "test", apply_filters=False)
    assert evaluation[:]["src"] == ["ab c", ""] and evaluation[:]["tgt"] == ["甲乙", "甲"]
    assert evaluation[:]["src_len"] == [3, 0]  # each text next to its own ids


# max_len=10, max_len_ratio=2.0; the char tokenizer makes one piece per non-space character.
FILTER_CASES = [
    ("abc", "甲乙丙", "keep"),
    ("abcd", "甲乙", "keep"),  # ratio exactly 2.0 is allowed
    ("a" * 10, "甲" * 10, "keep"),  # exactly max_len is allowed
    ("a b", "甲乙丙", "keep"),
    ("   ", "甲", "empty"),  # whitespace only
    ("a", "", "empty"),
    ("", "甲" * 20, "empty"),  # empty wins over too long
    ("a" * 11, "甲" * 11, "too_long"),
    ("a" * 12, "甲", "too_long"),  # too long wins over ratio
    ("abcdef", "甲乙", "bad_ratio"),
]


def test_filters_count_each_reason_once_and_remove_only_when_applied(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([(s, t) for s, t, _ in FILTER_CASES]))
    cfg = cfg_for(path, max_len=10, max_len_ratio=2.0)
    ds = load_split(cfg, "train", cache)
    kept_src = [s for s, _, reason in FILTER_CASES if reason == "keep"]

    filtered, report = encode_split(ds, CharTokenizer(), cfg, "train", apply_filters=True)
    assert (report.total, report.kept, report.empty, report.too_long, report.bad_ratio) == (10, 4, 3, 2, 1)
    assert filtered["src_ids"][:] == CharTokenizer().encode_src(kept_src)

    unfiltered, counted = encode_split(ds, CharTokenizer(), cfg, "valid", apply_filters=False)
    assert len(unfiltered) == 10 and counted.kept == 10
    assert (counted.empty, counted.too_long, counted.bad_ratio) == (3, 2, 1)


def test_filter_report_summary_is_one_readable_line() -> None:
    report = FilterReport("train", total=26759, kept=26700, empty=0, too_long=12, bad_ratio=47)
    assert report.summary() == "train: kept 26,700 of 26,759 pairs (empty 0, too long 12, length ratio 47)"
    counted = FilterReport("valid", total=788, kept=788, empty=1, too_long=0, bad_ratio=2, is_applied=False)
    assert "\n" not in counted.summary() and "not filtered" in counted.summary()


def test_second_encode_of_same_data_and_tokenizer_is_a_cache_hit(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("a" * 30, "甲"), ("ab", "甲乙"), ("abc", "甲乙丙")]))
    cfg = cfg_for(path, max_len=10)
    first_tok = CharTokenizer()
    first, _ = encode_split(load_split(cfg, "train", cache), first_tok, cfg, "train")
    assert first_tok.calls > 0

    second_tok = CharTokenizer()  # a new object with the same fingerprint, as after a restart
    second, report = encode_split(load_split(cfg, "train", cache), second_tok, cfg, "train")
    assert second_tok.calls == 0
    assert second.cache_files == first.cache_files
    assert second[:] == first[:] and report.kept == 2

    other_tok = CharTokenizer(fingerprint="char-tokenizer-2")  # a different model must re-encode
    encode_split(load_split(cfg, "train", cache), other_tok, cfg, "train")
    assert other_tok.calls > 0


def test_a_target_file_replaced_at_the_same_modification_time_is_encoded_again(tmp_path: Path, cache: Path) -> None:
    """`datasets` fingerprints a line-aligned pair by path and time; the encoding must follow the target file's
    content (`cp -p`, `rsync -a` and `tar x` keep the time)."""
    (tmp_path / "t.en").write_text("ab\n", encoding="utf-8")
    target = tmp_path / "t.zh"
    target.write_text("甲乙\n", encoding="utf-8")
    first, _ = encode_split(load_split(cfg_for(tmp_path / "t.{lang}"), "train", cache), CharTokenizer(), DataConfig(), "train")
    times = (target.stat().st_atime_ns, target.stat().st_mtime_ns)
    replacement = tmp_path / "new.zh"
    replacement.write_text("丙丁\n", encoding="utf-8")
    os.replace(replacement, target)
    os.utime(target, ns=times)
    again, _ = encode_split(load_split(cfg_for(tmp_path / "t.{lang}"), "train", cache), CharTokenizer(), DataConfig(), "train")
    assert again[0]["tgt_ids"] == CharTokenizer().encode_tgt(["丙丁"])[0] != first[0]["tgt_ids"]


def test_text_pair_encoding_is_cached_too(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "train.en").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "train.zh").write_text("一\n二\n", encoding="utf-8")
    cfg = cfg_for(tmp_path / "train.{lang}")
    encode_split(load_split(cfg, "train", cache), CharTokenizer(), cfg, "train")
    tokenizer = CharTokenizer()
    encode_split(load_split(cfg, "train", cache), tokenizer, cfg, "train")
    assert tokenizer.calls == 0


def test_edited_data_file_is_loaded_and_encoded_again(tmp_path: Path, cache: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", pairs([("ab", "甲")]))
    cfg = cfg_for(path)
    encode_split(load_split(cfg, "train", cache), CharTokenizer(), cfg, "train")
    write_jsonl(path, pairs([("abcd", "甲")]))
    tokenizer = CharTokenizer()
    encoded, _ = encode_split(load_split(cfg, "train", cache), tokenizer, cfg, "train")
    assert tokenizer.calls > 0 and encoded["src_len"][:] == [4]


# ----------------------------------------------------------------------------- large files


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 64])
def test_null_line_scan_reads_blocks_and_finds_a_null_line_across_their_boundaries(tmp_path: Path, monkeypatch, block: int) -> None:
    monkeypatch.setattr(data, "_SCAN_BLOCK", block)  # every split point of "\n \t null" across two reads
    cases = {
        b'{"a": 1}\n \t null\n{"a": 2}\n': True,
        b"\xef\xbb\xbf  null\n": True,  # BOM and indentation before the first record
        b'{"en": "null and void"}\n{"en": "a"}\n': False,  # "null" in the text, not at a line start
        b'{"a": 1}\n  x null\n': False,
        b"": False,
    }
    for i, (content, expected) in enumerate(cases.items()):
        path = tmp_path / f"{i}.jsonl"
        path.write_bytes(content)
        assert data._has_null_record(path) is expected, (block, content)


def test_sample_rows_draws_exactly_n_rows_the_same_way_for_a_seed() -> None:
    mask = sample_rows(1000, 100, seed=3)
    assert mask is not None and mask.dtype == bool and mask.shape == (1000,) and mask.sum() == 100
    assert np.array_equal(mask, sample_rows(1000, 100, seed=3))
    assert not np.array_equal(mask, sample_rows(1000, 100, seed=4))
    assert sample_rows(1000, 1000, seed=3) is None and sample_rows(1000, 0, seed=3) is None  # every row


def test_iter_texts_streams_a_column_in_batches_and_keeps_only_the_masked_rows(tmp_path: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "ROWS_PER_BATCH", 3)  # 10 rows: batches of 3, 3, 3, 1
    records = [(f"s{i}", f"t{i}") for i in range(10)]
    ds = load_split(cfg_for(write_jsonl(tmp_path / "train.jsonl", pairs(records))), "train", cache)
    assert list(iter_texts(ds, "tgt")) == [t for _, t in records]
    mask = np.zeros(10, dtype=bool)
    mask[[0, 3, 4, 9]] = True
    assert list(iter_texts(ds, "src", mask)) == ["s0", "s3", "s4", "s9"]


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "byte-order-mark"])
def test_records_whose_other_fields_mix_types_still_give_their_language_pairs(tmp_path: Path, cache: Path, bom: bool, caplog) -> None:
    """An "id" that is a number in one record and a string in another stops the Arrow reader; the pairs themselves
    are fine, so only the language fields are read."""
    records = [{"id": 4, "translation": {"en": "Hello.", "zh": "你好。"}}, {"id": "x5", "translation": {"en": "Thanks.", "zh": "谢谢。"}}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    if bom:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ds = load_split(cfg_for(path), "train", cache)
    assert ds[:] == {"src": ["Hello.", "Thanks."], "tgt": ["你好。", "谢谢。"]}
    assert "reading only the fields 'en' and 'zh' instead" in caplog.text


def test_a_file_read_in_python_once_goes_straight_to_its_table_on_the_next_start(tmp_path: Path, cache: Path, caplog, monkeypatch) -> None:
    """The Arrow reader's failure and the scan of every record (about a minute for 10M pairs) are done once per
    file: the file's cache folder remembers it, for the same language fields."""
    records = [{"id": 4, "translation": {"en": "Hello.", "zh": "你好。"}}, {"id": "x5", "translation": {"en": "Thanks.", "zh": "谢谢。"}}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    first = load_split(cfg_for(path), "train", cache)

    def not_again(*args, **kwargs):
        raise AssertionError("the file was read or scanned again")

    with monkeypatch.context() as m:
        m.setattr(data, "scan_json", not_again)
        m.setattr(data, "_load_builder", not_again)
        again = load_split(cfg_for(path), "train", cache)
        reversed_direction = load_split(cfg_for(path, src_lang="zh", tgt_lang="en"), "train", cache)
    assert again[:] == first[:] == {"src": ["Hello.", "Thanks."], "tgt": ["你好。", "谢谢。"]}
    assert reversed_direction[:] == {"src": ["你好。", "谢谢。"], "tgt": ["Hello.", "Thanks."]}
    assert "(in Python, cached)" in caplog.text
    # other fields are checked again, and named when the records lack them
    with pytest.raises(DataError, match=r"line 1: missing key 'translation.fr'"):
        load_split(cfg_for(path, src_lang="fr"), "train", cache)
