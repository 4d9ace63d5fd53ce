from tsparse.tokenizer import load_or_train_bpe, train_bpe


def test_bpe_is_deterministic_and_cached(wikitext_small, tmp_path):
    text = (wikitext_small / "train.txt").read_text()
    a, b = train_bpe(text, 400), train_bpe(text, 400)
    assert a.get_vocab() == b.get_vocab()
    assert a(text[:2000])["input_ids"] == b(text[:2000])["input_ids"]
    cached = load_or_train_bpe(text, 400, tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    again = load_or_train_bpe(text, 400, tmp_path)
    assert cached.get_vocab() == again.get_vocab() == a.get_vocab()
    assert cached.decode(cached(" The Tower of London")["input_ids"]) == " The Tower of London"
