"""The output Template in the forms OpenAI-compatible servers take: a JSON schema (``to_json_schema``) and a
llama.cpp GBNF grammar (``to_gbnf``), each of prefill + template, on both templates in use (preferences and
explanations, grounded and judge), with replies shaped as the transformers backend writes them (texts from
docs/llm.md and docs/explanations.md), and refusals where a form cannot express a template."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lane_ray.llm.backend import Choice, FreeText, Template, Text, UnsupportedTemplate, json_string_array
from lane_ray.llm.explain import EXPLAIN_PREFILL, ExplainSettings, explain_template, plan, reason_head
from lane_ray.llm.preferences import slot_template, user_vocabulary
from lane_ray.llm.prompts import PREFERENCE_PREFILL
from tests.unit.test_explain import request
from tests.unit.test_llm_text import USER, grounded


def gbnf_regex(grammar: str) -> str:
    """A Python regex for the one-rule grammars ``to_gbnf`` writes (literals, ``(a | b)`` groups of literals,
    character classes with ``{lo,hi}``): a reader of that grammar independent of the writer."""
    assert grammar.startswith("root ::= ") and "\n" not in grammar
    src, i, out = grammar[len("root ::= "):], 0, []
    while i < len(src):
        ch = src[i]
        if ch == " ":
            i += 1
        elif ch == '"':
            j, lit = i + 1, ""
            while src[j] != '"':
                if src[j] == "\\":
                    nxt = src[j + 1]
                    if nxt == "x":
                        lit += chr(int(src[j + 2: j + 4], 16))
                        j += 4
                        continue
                    lit += {"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt)
                    j += 2
                else:
                    lit += src[j]
                    j += 1
            out.append(re.escape(lit))
            i = j + 1
        elif ch in "()|?":
            out.append(ch)
            i += 1
        elif ch == "[":
            j = src.index("]", i + 1)
            while src[j - 1] == "\\" and src[j - 2] != "\\":
                j = src.index("]", j + 1)
            out.append(src[i: j + 1])
            i = j + 1
        elif ch == "{":
            j = src.index("}", i)
            out.append(src[i: j + 1])
            i = j + 1
        else:
            raise AssertionError(f"unexpected {src[i:i + 20]!r}")
    return "".join(out)


def check_json(t: Template, prefill: str, reply: str) -> dict:
    schema = t.to_json_schema(prefill)
    jsonschema.Draft202012Validator.check_schema(schema)
    value = json.loads(prefill + reply)
    jsonschema.Draft202012Validator(schema).validate(value)
    return schema


def accepts(t: Template, prefill: str, reply: str) -> bool:
    """Whether the grammar and the schema of prefill + template take ``prefill + reply`` (they always agree, and
    the template's regex takes what they take)."""
    in_gbnf = re.fullmatch(gbnf_regex(t.to_gbnf(prefill)), prefill + reply, flags=re.DOTALL) is not None
    try:
        check_json(t, prefill, reply)
        in_schema = True
    except (jsonschema.ValidationError, json.JSONDecodeError):
        in_schema = False
    assert in_gbnf == in_schema, (in_gbnf, in_schema, reply)
    assert t.matches(reply) or not in_gbnf, reply
    return in_gbnf


# --- preferences ------------------------------------------------------------------------------------------

S = grounded(m=3)
VOCAB = user_vocabulary(USER, S)
PREFS = slot_template(tuple(a.term for a in VOCAB), S, VOCAB)  # share order: Drama, Drama, Comedy


def test_preference_template_in_every_form():
    good = ('Drama movies about family bonds and loss", "Drama movies set in a quiet town", '
            '"Comedy movies with a dark and gritty tone"]}')
    assert accepts(PREFS, PREFERENCE_PREFILL, good)
    schema = check_json(PREFS, PREFERENCE_PREFILL, good)
    assert schema["required"] == ["preferences"] and schema["additionalProperties"] is False
    arr = schema["properties"]["preferences"]
    assert arr["minItems"] == arr["maxItems"] == 3 and arr["items"] is False
    assert [p["pattern"][:9] for p in arr["prefixItems"]] == ["^(Drama)(", "^(Drama)(", "^(Comedy)"]
    # after the connector's last word: a space, a letter, then up to 30 more (a token cannot run on from "with")
    assert arr["prefixItems"][0]["pattern"].endswith(
        "[\\x20][abcdefghijklmnopqrstuvwxyz][\\x20abcdefghijklmnopqrstuvwxyz]{0,30}$")
    glued = 'Drama movies withers", "Drama movies set in a town", "Comedy movies with tone"]}'
    assert PREFS.matches(glued) and not accepts(PREFS, PREFERENCE_PREFILL, glued)
    for bad in ['Comedy movies about family", "Drama movies set in a town", "Comedy movies with tone"]}',  # order
                'Drama movies about Family", "Drama movies set in a town", "Comedy movies with tone"]}',  # capital
                'Drama movies about family", "Drama movies set in a town"]}',  # two slots
                'Drama movies about family", "Drama movies set in 1995", "Comedy movies with tone"]}',  # digits
                'Drama movies about", "Drama movies set in a town", "Comedy movies with tone"]}',  # no free word
                'Drama films about family", "Drama movies set in a town", "Comedy movies with tone"]}']:
        assert not accepts(PREFS, PREFERENCE_PREFILL, bad), bad
    # the GBNF grammar is one rule over prefill + template
    g = PREFS.to_gbnf(PREFERENCE_PREFILL)
    assert g.startswith('root ::= "{\\"preferences\\": [\\"" ("Drama") (" movies with" | " movies about"')
    assert g.endswith('"\\"]}"')


def test_model_order_and_free_slots_are_json_shaped_too():
    model = slot_template(("Drama", "Crime", "1990s"), grounded(m=2, slot_order="model"))
    reply = 'Crime movies full of twists", "1990s movies that feel warm"]}'
    assert accepts(model, PREFERENCE_PREFILL, reply)
    items = model.to_json_schema(PREFERENCE_PREFILL)["properties"]["preferences"]
    assert items["items"]["pattern"].startswith("^(Drama|Crime|1990s)( movies with|")  # one schema for both slots
    free = json_string_array(2, min_tokens=1, max_tokens=3)
    assert accepts(free, '{"p": ["', 'any words at all", "more"]}')
    assert not accepts(free, '{"p": ["', 'a quote \\" inside", "x"]}')


# --- explanations -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["grounded", "judge"])
def test_explanation_template_in_every_form(mode):
    s = ExplainSettings(mode=mode)
    req = request()
    t = explain_template(req, s)
    head = reason_head(req, plan(req, s))
    judge = ', "fit": [0.8, 0.2, 0.0], "likelihood": "medium"' if mode == "judge" else ""
    reply = (head + 'it is a romantic romp, and the movie has an interesting sub-subploiter.", '
             '"evidence": "Heat (1995)", "because": "because its mob bosses share the grit of heat"' + judge + "}")
    reply = reply.replace(": it it is", ": it is")
    assert accepts(t, EXPLAIN_PREFILL, reply)
    schema = check_json(t, EXPLAIN_PREFILL, reply)
    props = schema["properties"]
    assert list(props) == ["reason", "evidence", "because"] + (["fit", "likelihood"] if mode == "judge" else [])
    assert props["evidence"] == {"type": "string", "enum": ["Heat (1995)", "Fargo (1996)", "Babe (1995)"]}
    # the title's parentheses are escaped for every engine; no \\. escape (llama.cpp's GBNF has none)
    assert props["reason"]["pattern"].startswith("^Casino \\(1995\\) suits your taste for gritty crime dramas: it ")
    assert "\\." not in props["reason"]["pattern"]
    if mode == "judge":
        assert props["fit"]["items"] == {"enum": [k / 10 for k in range(11)]} and props["fit"]["minItems"] == 3
        assert props["likelihood"] == {"type": "string", "enum": ["low", "medium", "high"]}
        assert not accepts(t, EXPLAIN_PREFILL, reply.replace("[0.8,", "[0.85,"))
        assert not accepts(t, EXPLAIN_PREFILL, reply.replace('"medium"', '"maybe"'))
    assert not accepts(t, EXPLAIN_PREFILL, reply.replace("Heat (1995)", "Alien (1979)"))  # not offered
    assert not accepts(t, EXPLAIN_PREFILL, reply.replace("romantic romp", "Romantic romp"))  # capital
    assert not accepts(t, EXPLAIN_PREFILL, reply.replace("suits your taste", "fits your taste"))  # fixed head


def test_citing_history_and_titles_with_metacharacters():
    s = ExplainSettings()
    req = request(contrib=(0.0, 0.0, 0.0), share=0.0, title="Dr. Strangelove [Kubrick] (1963) ^$*+?{}|")
    t = explain_template(req, s)
    head = reason_head(req, plan(req, s))
    reply = head + 'is a tense story.", "evidence": "Heat (1995)", "because": "because of the grit"}'
    assert accepts(t, EXPLAIN_PREFILL, reply)
    pattern = t.to_json_schema(EXPLAIN_PREFILL)["properties"]["reason"]["pattern"]
    assert pattern.startswith("^Dr[.] Strangelove \\[Kubrick\\] \\(1963\\) [\\x5e][$]\\*\\+\\?\\{\\}\\| comes from")


def test_llama_cpp_reads_the_schema_patterns():
    llama_grammar = pytest.importorskip("llama_cpp.llama_grammar", reason="llama-cpp-python is not installed")
    req = request(title="Dr. Strangelove [Kubrick] (1963) ^$*+?{}|")
    for t, prefill in [(PREFS, PREFERENCE_PREFILL), (explain_template(req, ExplainSettings(mode="judge")),
                                                      EXPLAIN_PREFILL)]:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(t.to_json_schema(prefill)))
        assert gbnf.startswith("root ::=") or "\nroot ::=" in gbnf
        assert "\\." not in gbnf  # llama.cpp's GBNF parser knows no such escape


# --- what the schema form cannot express ------------------------------------------------------------------

def test_not_json_shaped_templates_are_refused_with_the_reason():
    t = Template((Choice(("yes", "no")), Text(" because "), FreeText(1, 4), Text('"')))
    with pytest.raises(UnsupportedTemplate, match="free text outside a JSON string"):
        t.to_json_schema("")
    with pytest.raises(UnsupportedTemplate, match="not JSON"):
        Template((Text("hello "), Choice(("a", "b")))).to_json_schema("")
    with pytest.raises(UnsupportedTemplate, match="key is not fixed"):
        Template((Text('{"'), FreeText(1, 2), Text('": 1}'))).to_json_schema("")
    with pytest.raises(UnsupportedTemplate, match="quote, backslash"):  # in a pattern; an enum may hold one
        Template((Choice(("x", "y")), Text(' say \\"hi\\""}'))).to_json_schema('{"a": "')
    quoted = Template((FreeText(1, 2), Text('", "t": "say \\"hi\\""}'))).to_json_schema('{"a": "')
    assert quoted["properties"]["t"] == {"type": "string", "enum": ['say "hi"']}
    with pytest.raises(UnsupportedTemplate, match="not a JSON value"):
        Template((Text('{"n": '), Choice(("one", "two")), Text("}"))).to_json_schema("")
    # every template has a grammar: the same one as a free-text reply
    assert re.fullmatch(gbnf_regex(t.to_gbnf("")), 'no because it rains"')
    assert t.to_gbnf('say "x" \\ \n') .startswith('root ::= "say \\"x\\" \\\\ \\n" ("yes" | "no")')
