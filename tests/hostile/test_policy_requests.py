"""Policy requests as a hostile client sends them: however the bytes are cut into reads,
the server reads the same requests (the one-read fast path and the line-by-line path agree)."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from greylist.adapters.policyd import MAX_REQUEST, MAX_VALUE, RequestError, RequestReader

names = st.one_of(st.sampled_from(["request", "client_address", "sender", "recipient", "helo_name", "x", ""]),
                  st.sampled_from([" sender", "x\t", "\u00a0y", "a b", "\u2028", "n" * 99, "n" * 101]),
                  st.integers(0, 999).map(lambda i: f"n{i}"))  # over 100 names: too many
short_values = st.text(max_size=20).filter(lambda v: "\n" not in v)
values = st.one_of(short_values, st.text(alphabet="ab\u00e9\r", min_size=MAX_VALUE - 2, max_size=MAX_VALUE + 40))
garbage = st.binary(max_size=30).filter(lambda b: b"\n" not in b)
lines = st.one_of(st.tuples(names, values).map(lambda nv: f"{nv[0]}={nv[1]}".encode()), garbage)
requests = st.lists(lines, max_size=8).map(lambda ls: b"".join(line + b"\n" for line in ls) + b"\n")
# about the most lines allowed, each short (read byte by byte, long ones took seconds an example)
short_lines = st.one_of(st.tuples(names, short_values).map(lambda nv: f"{nv[0]}={nv[1]}".encode()), garbage)
long_requests = st.lists(short_lines, min_size=99, max_size=102).map(
    lambda ls: b"".join(line + b"\n" for line in ls) + b"\n")


def read(chunks: list[bytes]):
    reader = RequestReader()
    out = []
    try:
        for chunk in chunks:
            out.extend(reader.feed(chunk))
    except RequestError as exc:
        out.append(str(exc))
    return out


@settings(max_examples=400, deadline=None)  # a correctness property, not a timing
@given(st.lists(requests, min_size=1, max_size=3))
def test_one_read_and_byte_by_byte_give_the_same_requests(stream):
    for request in stream:  # each request in one read, as Postfix sends it
        whole = read([request])
        assert whole == read([bytes([b]) for b in request])
    data = b"".join(stream)
    assert read([data]) == read([bytes([b]) for b in data])


@settings(max_examples=60, deadline=None)
@given(long_requests)
def test_a_request_of_about_a_hundred_lines_reads_the_same_in_one_read(request):
    assert read([request]) == read([bytes([b]) for b in request])


def test_a_long_value_is_cut_in_the_one_read_path_too():
    got = read([b"request=smtpd_access_policy\nhelo_name=" + b"h" * 1000 + b"\n\n"])
    assert got == [{"request": "smtpd_access_policy", "helo_name": "h" * MAX_VALUE, "_truncated": "helo_name"}]


def test_more_than_a_hundred_names_in_one_read_are_refused_as_line_by_line():
    for count, refused in ((100, False), (101, True)):
        request = b"".join(b"n%d=v\n" % i for i in range(count)) + b"\n"
        assert len(request) < 2048  # the one-read path
        whole, by_byte = read([request]), read([bytes([b]) for b in request])
        assert whole == by_byte
        assert (whole == ["more than 100 attributes"]) is refused


def test_requests_sent_ahead_are_each_answered_however_many_a_read_holds():
    """A client that sends its next requests before the answers (Postfix does not; a test
    tool or another client may) has each answered: the 32 KiB bound is a request's, not a
    read's. 300 requests in one read of 44 KB were refused as "a request larger than 32768
    bytes", one DUNNO for all of them."""
    stream = [b"request=smtpd_access_policy\nclient_address=10.0.%d.%d\nsender=s%d@example.org\n"
              b"recipient=r%d@example.net\nhelo_name=%s\n\n" % (n // 250, n % 250, n, n, b"h" * 40)
              for n in range(300)]
    data = b"".join(stream)
    assert len(data) > MAX_REQUEST
    each = read(stream)
    assert len(each) == 300 and all(isinstance(r, dict) for r in each)
    assert read([data]) == each
    assert read([data[i:i + 1000] for i in range(0, len(data), 1000)]) == each


def test_one_request_over_the_bound_is_refused_however_it_is_cut():
    """Many short lines, or one endless line (its skipped bytes count), in one read or many."""
    many_lines = b"request=smtpd_access_policy\n" + b"".join(b"x=%s\n" % (b"v" * 400) for _ in range(90)) + b"\n"
    endless = b"request=smtpd_access_policy\nhelo_name=" + b"h" * (MAX_REQUEST + 10) + b"\n\n"
    refused = [f"a request larger than {MAX_REQUEST} bytes"]
    for request in (many_lines, endless):
        assert len(request) > MAX_REQUEST
        assert read([request]) == refused
        assert read([request[i:i + 1500] for i in range(0, len(request), 1500)]) == refused
    # within the bound, the same request is read (its long value cut)
    assert read([b"request=smtpd_access_policy\nhelo_name=" + b"h" * 30000 + b"\n\n"]) == [
        {"request": "smtpd_access_policy", "helo_name": "h" * MAX_VALUE, "_truncated": "helo_name"}]
