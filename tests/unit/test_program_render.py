"""The renderer inlines the program's own headers recursively, each once (as #pragma once
would; a template without it each time), renders the constants header from the limits, and names a missing header."""

from __future__ import annotations

import pytest

from xdp.errors import CompileError
from xdp.limits import DEFAULT_LIMITS, Limits
from xdp.program import expand_includes, render_source


def test_nested_includes_are_inlined_once_each_in_dependency_order() -> None:
    headers = {
        "a.h": '#pragma once\nint a;\n',
        "b.h": '#pragma once\n#include "a.h"\nint b;\n',
        "c.h": '#pragma once\n#include "a.h"\n#include "b.h"\nint c;\n',
    }
    text = expand_includes('#include "c.h"\n#include "b.h"\n#include <linux/types.h>\nint main;\n',
                           headers)
    code = [line for line in text.splitlines() if line]
    assert code == ["int a;", "int b;", "int c;", "#include <linux/types.h>", "int main;"]


def test_a_template_without_pragma_once_is_inlined_each_time_it_is_included() -> None:
    headers = {
        "t.inc": "int T(NAME);\n",
        "four.h": '#pragma once\n#define NAME four\n#include "t.inc"\n#undef NAME\n',
        "six.h": '#pragma once\n#define NAME six\n#include "t.inc"\n#undef NAME\n',
    }
    text = expand_includes('#include "four.h"\n#include "six.h"\n#include "four.h"\n', headers)
    assert text.count("int T(NAME);") == 2


def test_a_missing_header_is_named() -> None:
    with pytest.raises(CompileError, match='#include "nope.h": no such header'):
        expand_includes('#include "a.h"\n', {"a.h": '#include "nope.h"\n'})


def test_the_program_is_one_text_with_the_limits_rendered_in() -> None:
    text = render_source(Limits(max_vips=7), "/sys/fs/bpf/lbctl/x")
    assert '#include "' not in text
    assert "#pragma once" not in text
    assert "#define LB_MAX_VIPS 7\n" in text
    assert text.count("enum lb_outcome {") == 1
    assert render_source(DEFAULT_LIMITS, "/p").count("struct nat_entry {") == 1
