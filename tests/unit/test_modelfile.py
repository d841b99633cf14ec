"""Tests for the Ollama-style Modelfile parser."""

from pathlib import Path

import pytest

from supervisor.modelfile import (
    Modelfile,
    ModelfileError,
    load_modelfile,
    parse_modelfile,
    request_defaults,
)

REPO = Path(__file__).resolve().parents[2]


def error_of(text: str, source: str = "gemma.Modelfile") -> ModelfileError:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text, source)
    return info.value


def test_every_instruction() -> None:
    text = (
        "FROM ./gemma.gguf\n"
        "PARAMETER num_ctx 4096\n"
        "PARAMETER temperature 0.2\n"
        "PARAMETER use_mmap false\n"
        "TEMPLATE {{ .Prompt }}\n"
        "SYSTEM You are terse.\n"
        "ADAPTER ./lora.gguf\n"
        "LICENSE MIT\n"
        "LICENSE Apache-2.0\n"
        "MESSAGE user hi there\n"
        "MESSAGE assistant hello\n"
    )
    mf = parse_modelfile(text, "x.Modelfile")
    assert mf == Modelfile(
        source="x.Modelfile",
        from_="./gemma.gguf",
        from_line=1,
        parameters=(("num_ctx", 4096), ("temperature", 0.2), ("use_mmap", False)),
        template="{{ .Prompt }}",
        system="You are terse.",
        adapters=("./lora.gguf",),
        license=("MIT", "Apache-2.0"),
        messages=(("user", "hi there"), ("assistant", "hello")),
    )


def test_parameter_types() -> None:
    mf = parse_modelfile(
        "FROM m\n"
        "PARAMETER seed -1\n"
        "PARAMETER top_p .9\n"
        "PARAMETER repeat_penalty 1\n"
        "PARAMETER mirostat_eta 1e-2\n"
        "PARAMETER numa TRUE\n"
        "PARAMETER use_mlock 0\n"
    )
    assert mf.parameters == (
        ("seed", -1), ("top_p", 0.9), ("repeat_penalty", 1.0), ("mirostat_eta", 0.01),
        ("numa", True), ("use_mlock", False),
    )
    assert isinstance(mf.param("repeat_penalty"), float)
    assert isinstance(mf.param("seed"), int)


def test_triple_quotes_span_lines() -> None:
    text = (
        "FROM m\n"
        'TEMPLATE """<start_of_turn>user\n'
        "{{ .Prompt }}   \n"
        "\n"
        "# not a comment inside a block\n"
        '<start_of_turn>model"""\n'
        'SYSTEM """one line"""\n'
        "PARAMETER num_ctx 8\n"
    )
    mf = parse_modelfile(text)
    assert mf.template == (
        "<start_of_turn>user\n{{ .Prompt }}   \n\n# not a comment inside a block\n"
        "<start_of_turn>model"
    )
    assert mf.system == "one line"
    assert mf.param("num_ctx") == 8


def test_triple_quotes_keep_inner_quotes_and_backslashes() -> None:
    mf = parse_modelfile('FROM m\nSYSTEM """say "hi" \\n"""\n')
    assert mf.system == 'say "hi" \\n'


def test_double_quotes_and_escapes() -> None:
    text = (
        "FROM m\n"
        'PARAMETER stop "<end_of_turn>"\n'
        'PARAMETER stop "say \\"stop\\" now"\n'
        'SYSTEM "back\\\\slash"\n'
        'MESSAGE user "  padded  "\n'
    )
    mf = parse_modelfile(text)
    assert mf.stops == ("<end_of_turn>", 'say "stop" now')
    assert mf.system == "back\\slash"
    assert mf.messages == (("user", "  padded  "),)


def test_double_quotes_may_span_lines_like_ollama() -> None:
    mf = parse_modelfile('FROM m\nSYSTEM "first\nsecond"\nPARAMETER top_k 5\n')
    assert mf.system == "first\nsecond"
    assert mf.param("top_k") == 5


def test_comments_blank_lines_and_crlf() -> None:
    text = "\ufeff# header\r\n\r\n   # indented comment\r\nFROM  hf://org/repo/m.gguf  \r\n\r\n"
    mf = parse_modelfile(text)
    assert mf.from_ == "hf://org/repo/m.gguf"
    assert mf.from_line == 4
    assert mf.parameters == ()
    assert mf.template is None and mf.system is None


def test_repeated_stop_collected_in_order() -> None:
    mf = parse_modelfile("FROM m\nPARAMETER stop a\nPARAMETER top_k 1\nPARAMETER stop b\n")
    assert mf.stops == ("a", "b")
    assert mf.param("stop") == ["a", "b"]
    assert mf.parameters == (("stop", "a"), ("top_k", 1), ("stop", "b"))


def test_param_last_value_wins_and_default() -> None:
    mf = parse_modelfile("FROM m\nPARAMETER num_ctx 1024\nPARAMETER num_ctx 2048\n")
    assert mf.param("num_ctx") == 2048
    assert mf.param("top_k") is None
    assert mf.param("top_k", 40) == 40
    assert mf.param("stop", []) == []
    assert mf.stops == ()


def test_case_insensitive_instructions_and_names() -> None:
    mf = parse_modelfile(
        "from m\nParameter NUM_CTX 512\nsystem hi\nTemplate t\nmessage USER q\n"
        "adapter a\nlicense l\n"
    )
    assert mf.from_ == "m"
    assert mf.parameters == (("num_ctx", 512),)
    assert mf.system == "hi"
    assert mf.template == "t"
    assert mf.messages == (("user", "q"),)
    assert mf.adapters == ("a",)
    assert mf.license == ("l",)


def test_error_bad_int() -> None:
    err = error_of("# comment\nFROM m\nPARAMETER num_ctx big\n")
    assert str(err) == "gemma.Modelfile:3: PARAMETER num_ctx: expected an integer, got 'big'"
    assert (err.file, err.line, err.key) == ("gemma.Modelfile", 3, "PARAMETER num_ctx")
    assert err.message == "expected an integer, got 'big'"


def test_error_bad_float_and_bool() -> None:
    assert str(error_of("FROM m\nPARAMETER temperature hot\n")) == (
        "gemma.Modelfile:2: PARAMETER temperature: expected a number, got 'hot'"
    )
    assert str(error_of("FROM m\nPARAMETER temperature nan\n")) == (
        "gemma.Modelfile:2: PARAMETER temperature: expected a number, got 'nan'"
    )
    assert str(error_of("FROM m\n\nPARAMETER use_mmap maybe\n")) == (
        "gemma.Modelfile:3: PARAMETER use_mmap: expected true or false, got 'maybe'"
    )
    assert str(error_of("FROM m\nPARAMETER top_k 1.5\n")) == (
        "gemma.Modelfile:2: PARAMETER top_k: expected an integer, got '1.5'"
    )


def test_error_out_of_range() -> None:
    assert str(error_of("FROM m\nPARAMETER num_ctx 0\n")) == (
        "gemma.Modelfile:2: PARAMETER num_ctx: expected a value >= 1, got '0'"
    )
    assert str(error_of("FROM m\nPARAMETER top_p 1.5\n")) == (
        "gemma.Modelfile:2: PARAMETER top_p: expected a value between 0 and 1, got '1.5'"
    )


def test_error_unknown_parameter_with_suggestion() -> None:
    assert str(error_of("FROM m\nPARAMETER num_ctxx 5\n")) == (
        "gemma.Modelfile:2: PARAMETER num_ctxx: unknown parameter (did you mean num_ctx?)"
    )
    assert str(error_of("FROM m\nPARAMETER zzz 5\n")) == (
        "gemma.Modelfile:2: PARAMETER zzz: unknown parameter"
    )


def test_error_parameter_without_name_or_value() -> None:
    assert str(error_of("FROM m\nPARAMETER\n")) == (
        "gemma.Modelfile:2: PARAMETER: expected a name and a value, got nothing"
    )
    assert str(error_of("FROM m\nPARAMETER num_ctx   \n")) == (
        "gemma.Modelfile:2: PARAMETER num_ctx: expected a value, got nothing"
    )
    assert str(error_of("FROM m\nPARAMETER stop \"\"\n")) == (
        "gemma.Modelfile:2: PARAMETER stop: expected a non-empty string, got ''"
    )


def test_error_missing_from() -> None:
    err = error_of("# nothing\nPARAMETER num_ctx 5\n")
    assert str(err) == "gemma.Modelfile: FROM: expected a FROM instruction, found none"
    assert err.line is None
    assert str(error_of("")) == "gemma.Modelfile: FROM: expected a FROM instruction, found none"


def test_error_second_from() -> None:
    err = error_of("\nFROM a\nSYSTEM s\nFROM b\n")
    assert str(err) == (
        "gemma.Modelfile:4: FROM: expected exactly one FROM, found a second "
        "(the first is at line 2)"
    )


def test_error_from_without_value() -> None:
    assert str(error_of("FROM\n")) == "gemma.Modelfile:1: FROM: expected a value, got nothing"


def test_error_message_role() -> None:
    assert str(error_of("FROM m\nMESSAGE bot hi\n")) == (
        "gemma.Modelfile:2: MESSAGE: expected a role of system, user or assistant, got 'bot'"
    )
    assert str(error_of("FROM m\nMESSAGE\n")) == (
        "gemma.Modelfile:2: MESSAGE: expected a role of system, user or assistant, got nothing"
    )
    assert str(error_of("FROM m\nMESSAGE user\n")) == (
        "gemma.Modelfile:2: MESSAGE: expected a value, got nothing"
    )


def test_error_unknown_instruction() -> None:
    assert str(error_of("FROM m\n\nFORM x\n")) == (
        "gemma.Modelfile:3: FORM: unknown instruction (did you mean FROM?); expected one of "
        "FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE, MESSAGE"
    )
    assert str(error_of("FROM m\nEXPOSE 80\n")) == (
        "gemma.Modelfile:2: EXPOSE: unknown instruction; expected one of "
        "FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE, MESSAGE"
    )


def test_error_unterminated_triple_quote_points_at_opening_line() -> None:
    err = error_of('FROM m\nPARAMETER top_k 1\nTEMPLATE """a\nb\nc\n')
    assert str(err) == (
        'gemma.Modelfile:3: TEMPLATE: expected a closing """ for the value opened here, '
        "got the end of file"
    )
    assert err.line == 3


def test_error_unterminated_double_quote() -> None:
    err = error_of('FROM m\nSYSTEM "abc\nPARAMETER top_k 1\n')
    assert str(err) == (
        'gemma.Modelfile:2: SYSTEM: expected a closing " for the value opened here, '
        "got the end of file"
    )


def test_error_text_after_closing_quote() -> None:
    assert str(error_of('FROM m\nSYSTEM """a\nb""" extra\n')) == (
        "gemma.Modelfile:2: SYSTEM: unexpected text after the closing quote: 'extra'"
    )
    assert str(error_of('FROM m\nPARAMETER stop "a" b\n')) == (
        "gemma.Modelfile:2: PARAMETER stop: unexpected text after the closing quote: 'b'"
    )


def test_error_line_after_multiline_block() -> None:
    err = error_of('FROM m\nTEMPLATE """\n1\n2\n"""\nPARAMETER num_ctx x\n')
    assert err.line == 6


def test_request_defaults_mapping() -> None:
    mf = parse_modelfile(
        "FROM m\n"
        "PARAMETER num_ctx 4096\n"
        "PARAMETER temperature 0.5\n"
        "PARAMETER top_p 0.9\n"
        "PARAMETER top_k 40\n"
        "PARAMETER min_p 0.05\n"
        "PARAMETER repeat_penalty 1.1\n"
        "PARAMETER presence_penalty 0.2\n"
        "PARAMETER frequency_penalty 0.3\n"
        "PARAMETER seed 42\n"
        "PARAMETER stop </s>\n"
        "PARAMETER stop <|im_end|>\n"
        "PARAMETER num_predict 128\n"
        "PARAMETER mirostat 2\n"
    )
    assert request_defaults(mf) == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": 0.3,
        "seed": 42,
        "stop": ["</s>", "<|im_end|>"],
        "max_tokens": 128,
    }


def test_request_defaults_skips_unlimited_num_predict() -> None:
    assert request_defaults(parse_modelfile("FROM m\nPARAMETER num_predict -1\n")) == {}
    assert request_defaults(parse_modelfile("FROM m\nPARAMETER num_predict -2\n")) == {}
    assert request_defaults(parse_modelfile("FROM m\n")) == {}


def test_shipped_demo_modelfile_parses() -> None:
    path = REPO / "modelfiles" / "gemma3-270m.Modelfile"
    mf = load_modelfile(path)
    assert mf.source == str(path)
    assert mf.from_ == "demo://gemma3-270m"
    assert mf.template is None
    assert mf.param("num_ctx") == 2048
    assert request_defaults(mf) == {
        "temperature": 0.7, "top_k": 64, "top_p": 0.95, "stop": ["<end_of_turn>"],
    }


def test_load_modelfile_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.Modelfile"
    with pytest.raises(ModelfileError) as info:
        load_modelfile(missing)
    assert str(info.value) == f"{missing}: no such file"
    bad = tmp_path / "bad.Modelfile"
    bad.write_text("FROM m\nPARAMETER seed x\n")
    with pytest.raises(ModelfileError) as info:
        load_modelfile(bad)
    assert str(info.value) == f"{bad}:2: PARAMETER seed: expected an integer, got 'x'"


def test_modelfile_error_is_a_value_error() -> None:
    assert isinstance(error_of("NOPE"), ValueError)
