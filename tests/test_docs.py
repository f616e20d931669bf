"""Every public name is documented, with an example, and listed in README.md.

Public names: ``yellowfin_optax.__all__``. The examples in the docstrings are
run by pytest's ``--doctest-modules`` on the package (pyproject's addopts);
here we check that they exist.

Run this file as a script to print README.md's API table (``| `name` | kind |
what it is |`` rows) from the module::

  python tests/test_docs.py
"""

import inspect
import os
import re
import shlex
import types

import pytest

import yellowfin_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
PUBLIC = {name: getattr(yellowfin_optax, name)
          for name in yellowfin_optax.__all__}
FUNCTIONS = sorted(n for n, o in PUBLIC.items() if inspect.isfunction(o))
ROW = re.compile(r'\s*\|\s*`([^`]+)`\s*\|')


def _readme() -> str:
  with open(README, encoding='utf-8') as f:
    return f.read()


def test_all_lists_every_public_attribute_once():
  public_attrs = {n for n, v in vars(yellowfin_optax).items()
                  if not n.startswith('_')
                  and not isinstance(v, types.ModuleType)}
  assert len(yellowfin_optax.__all__) == len(set(yellowfin_optax.__all__))
  assert set(yellowfin_optax.__all__) == public_attrs


@pytest.mark.parametrize('name', sorted(PUBLIC))
def test_public_name_has_docstring(name):
  doc = inspect.getdoc(PUBLIC[name])
  assert doc and len(doc.strip()) > 20, f'{name} has no real docstring'
  # A NamedTuple without a docstring gets 'Name(field, ...)'.
  assert not doc.startswith(f'{name}('), f'{name} has only the generated one'


@pytest.mark.parametrize('name', FUNCTIONS)
def test_public_function_has_examples_section(name):
  doc = inspect.getdoc(PUBLIC[name])
  assert re.search(r'^Examples?:\s*$', doc, re.M), (
      f'{name} docstring has no Examples: section')
  examples = re.split(r'^Examples?:\s*$', doc, flags=re.M)[-1]
  assert '>>>' in examples, f"{name}'s Examples: section has no doctest"


def api_table() -> str:
  """The markdown API table (name | kind | what it is), from the module."""
  def summary(obj):
    line = ' '.join(inspect.getdoc(obj).strip().split('\n\n')[0].split())
    line = re.sub(r':(?:func|class|meth|mod|attr):`~?([^`]+)`', r'`\1`', line)
    line = re.sub(r':math:`([^`]+)`', r'`\1`', line)
    return line.replace('``', '`').replace('|', '\\|')
  rows = ['| name | kind | what it is |', '|---|---|---|']
  for name in sorted(PUBLIC, key=lambda n: (inspect.isclass(PUBLIC[n]), n)):
    kind = 'class' if inspect.isclass(PUBLIC[name]) else 'function'
    rows.append(f'| `{name}` | {kind} | {summary(PUBLIC[name])} |')
  return '\n'.join(rows)


def readme_api_table_names(text: str) -> list[str]:
  """The first-column names of the README's table of public names: the one
  markdown table whose rows start with a backquoted public name."""
  tables, current = [], []
  for line in text.splitlines() + ['']:
    if line.lstrip().startswith('|'):
      current.append(line)
    elif current:
      tables.append(current)
      current = []
  api = [[m.group(1) for m in map(ROW.match, table) if m]
         for table in tables]
  api = [names for names in api if set(names) & set(PUBLIC)]
  assert len(api) == 1, (
      f'README.md should have one table of the public names; found {len(api)}')
  return api[0]


def test_readme_api_table_lists_exactly_the_public_names():
  listed = readme_api_table_names(_readme())
  assert len(listed) == len(set(listed)), 'duplicate rows in the API table'
  missing = sorted(set(PUBLIC) - set(listed))
  extra = sorted(set(listed) - set(PUBLIC))
  assert not missing and not extra, (
      f'README API table is out of date: missing {missing}, extra {extra}. '
      'Print the table with: python tests/test_docs.py')


def _words(line: str) -> list[str]:
  try:
    return shlex.split(line, comments=True)
  except ValueError:  # an unbalanced quote, e.g. in a comment
    return line.split('#')[0].split()


def _commands(block: str) -> list[str]:
  """The shell commands of a code block: blank and comment lines dropped,
  backslash continuations joined, trailing comments stripped."""
  joined = re.sub(r'\\\n', ' ', block)
  return [' '.join(w) for w in map(_words, joined.splitlines()) if w]


def test_readme_opens_with_the_two_commands():
  first_block = re.search(r'```[a-z]*\n(.*?)```', _readme(), re.S)
  assert first_block, 'README.md has no code block'
  commands = _commands(first_block.group(1))
  assert len(commands) == 2, (
      f'the first code block should hold exactly two commands: {commands}')
  assert 'python examples/digits.py' in commands[0], commands[0]
  assert 'python -m pytest' in commands[1], commands[1]
  ci = os.path.join(ROOT, '.ci', 'run')
  if os.path.exists(ci):  # CI runs the README's test command
    with open(ci, encoding='utf-8') as f:
      ci_commands = [' '.join(_words(line)) for line in f]
    pytest_command = commands[1][commands[1].index('python -m pytest'):]
    assert any(pytest_command in c for c in ci_commands), (
        f'.ci/run does not run the README command {pytest_command!r}')


def test_commands_parser():
  block = ('# setup\npip install -e .  # the package\n'
           "python examples/digits.py \\\n  --steps 10\n\n")
  assert _commands(block) == ['pip install -e .',
                              'python examples/digits.py --steps 10']


if __name__ == '__main__':
  print(api_table())
