"""Secret files read with one plain error line, the warnings about them, and the link's token."""

import pytest

from shardgate.proto.link_auth import link_metadata, read_token
from shardgate.proto.secret_files import host_of, is_loopback, read_secret_lines, readable_by_others


def test_secret_lines_are_the_stripped_non_blank_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text(" first \n\n\tsecond\n")
    assert read_secret_lines(str(path), "--api-key-file") == ["first", "second"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--api-key-file {path}: cannot read it (No such file or directory)"),
        ("", "--api-key-file {path}: the file is empty"),
        (" \n\n", "--api-key-file {path}: the file is empty"),
        (b"\xff\xfe", "--api-key-file {path}: not UTF-8 text"),
    ],
)
def test_a_secret_file_that_cannot_serve_is_one_line_naming_flag_and_file(tmp_path, content, message):
    path = tmp_path / "keys"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as raised:
        read_secret_lines(str(path), "--api-key-file")
    assert str(raised.value).startswith(message.format(path=path)) and "\n" not in str(raised.value)


def test_a_folder_is_unreadable_as_a_secret_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        read_secret_lines(str(tmp_path), "--api-key-file")


def test_a_secret_file_others_can_read_is_named_with_its_mode(tmp_path):
    path = tmp_path / "keys"
    path.write_text("k\n")
    path.chmod(0o600)
    assert readable_by_others(str(path), "--api-key-file") is None
    path.chmod(0o640)
    assert readable_by_others(str(path), "--api-key-file") == (
        f"--api-key-file {path} is readable by group (mode 0640); make it readable by its owner only (chmod 600)"
    )
    path.chmod(0o644)
    assert "readable by group and others (mode 0644)" in readable_by_others(str(path), "--api-key-file")


def test_the_token_file_holds_one_long_enough_token(tmp_path):
    path = tmp_path / "token"
    path.write_text("0123456789abcdef0123\n")
    assert read_token(str(path), "--listen-token-file") == "0123456789abcdef0123"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        read_token(str(path), "--listen-token-file")
    path.write_text("0123456789abcdef0123\nsecond-line-token-000\n")
    with pytest.raises(ValueError, match="holds 2 lines, expected one token"):
        read_token(str(path), "--listen-token-file")
    assert link_metadata("t" * 16, "s") == (("authorization", "Bearer " + "t" * 16), ("shardgate-session", "s"))
    assert link_metadata(None, None) == ()


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True), ("0.0.0.0", False)]
    + [("10.0.0.1", False), ("example.com", False), ("::", False)],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_host_of_an_address():
    assert [host_of(a) for a in ("10.0.0.1:50100", "[::1]:50100", "host")] == ["10.0.0.1", "[::1]", "host"]
