"""Minerva-style final-answer normalisation and answer extraction, linear time.

The DAPO reference scorer (verl's ``math_dapo``) compares the model's final
answer with the ground truth after both go through the ``normalize_final_answer``
procedure published with Minerva (Lewkowycz et al., 2022, appendix), in this order:

1. keep the text after the last ``=``;
2. apply a fixed list of substitutions, then delete a fixed list of expressions
   (unit words, ``\\text{}`` leftovers, ``^\\circ``, ``,\\!`` ...);
3. keep only the first ``$...$`` span of a line, unwrap the first-closing-brace
   ``\\text{..}``, ``\\textbf{..}``, ``\\overline{..}`` and the outermost
   ``\\boxed{..}`` of a line;
4. expand the shorthand ``\\fracab`` -> ``\\frac{a}{b}`` and ``\\sqrta`` -> ``\\sqrt{a}``;
5. drop ``$``, drop commas when the rest is all digits, strip.

The reference writes steps 3-4 as regular expressions without DOTALL, so each of
them acts line by line. Here they are written as single forward scans (no
backtracking), which keeps the cost linear in the input length even for a
pathological ground truth, while giving the same strings.
"""

from __future__ import annotations

import re

# Step 2a: (before, after) pairs, applied in order with plain replacement.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)

# Step 2b: deleted in order. Plain substring deletion, as published: "cm" also
# vanishes from inside longer words.
REMOVED_EXPRESSIONS: tuple[str, ...] = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)

# Fixed-width patterns: the engine tries each start position once, so these are
# linear. `[^{]` may be a newline, exactly as in the reference.
_FRAC_SHORTHAND = re.compile(r"frac([^{])(.)")
_SQRT_SHORTHAND = re.compile(r"sqrt([^{])")

# The DAPO answer line. The literal prefix anchors every attempt, so the
# worst case is quadratic only in the (300-character) window it is run on.
ANSWER_PATTERN = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

BOXED_OPENER = "\\boxed{"


def _first_dollar_span(line: str) -> str:
    """A line holding two or more ``$`` becomes ``$`` + text between the first two + ``$``."""
    first = line.find("$")
    if first < 0:
        return line
    second = line.find("$", first + 1)
    if second < 0:
        return line
    return "$" + line[first + 1 : second] + "$"


def _unwrap_to_first_brace(line: str, opener: str) -> str:
    """Replace every ``opener...}`` (up to the first ``}``) by its inside, scanning left to right.

    Matches do not overlap and the scan resumes after the consumed ``}``, so a
    nested ``\\text{\\text{a}}`` keeps its inner opener, as the lazy pattern does.
    """
    pieces: list[str] = []
    pos = 0
    while True:
        start = line.find(opener, pos)
        if start < 0:
            break
        close = line.find("}", start + len(opener))
        if close < 0:
            # No closing brace after this opener means none after later ones either.
            break
        pieces.append(line[pos:start])
        pieces.append(line[start + len(opener) : close])
        pos = close + 1
    pieces.append(line[pos:])
    return "".join(pieces)


def _unwrap_outer_boxed(line: str) -> str:
    """Unwrap ``\\boxed{`` ... last ``}`` of the line (a greedy match, at most once per line)."""
    start = line.find(BOXED_OPENER)
    if start < 0:
        return line
    close = line.rfind("}")
    if close < start + len(BOXED_OPENER):
        return line
    return line[:start] + line[start + len(BOXED_OPENER) : close] + line[close + 1 :]


def _unwrap_line(line: str) -> str:
    line = _first_dollar_span(line)
    line = _unwrap_to_first_brace(line, "\\text{")
    line = _unwrap_to_first_brace(line, "\\textbf{")
    line = _unwrap_to_first_brace(line, "\\overline{")
    return _unwrap_outer_boxed(line)


def normalize_final_answer(answer: str) -> str:
    """Normalise a final answer the way the Minerva / DAPO scorer does (see module doc)."""
    text = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        text = text.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        text = text.replace(expr, "")
    # Each unwrap step maps every line on its own and never adds or removes a
    # newline, so running all of them line by line equals running them one after
    # the other over the whole text.
    text = "\n".join(_unwrap_line(line) for line in text.split("\n"))
    text = _FRAC_SHORTHAND.sub(r"frac{\1}{\2}", text)
    text = _SQRT_SHORTHAND.sub(r"sqrt{\1}", text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def extract_answer_line(text: str) -> str | None:
    """The capture of the last ``Answer: ...`` match in ``text``, or None.

    ``\\s*`` after the colon also eats a newline, so ``Answer:\\n42`` yields ``42``.
    """
    last = None
    for match in ANSWER_PATTERN.finditer(text):
        last = match
    return None if last is None else last.group(1)


def last_boxed_content(text: str) -> str | None:
    """Inside of the last ``\\boxed{...}`` with balanced braces, or None (absent or unclosed)."""
    start = text.rfind(BOXED_OPENER)
    if start < 0:
        return None
    depth = 0
    body = start + len(BOXED_OPENER)
    for i in range(body - 1, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[body:i]
    return None
