"""Every public name is documented, with an example, and listed in README.md.

Public names: ``yellowfin_optax.__all__`` (or, without it, the package's
public non-module attributes) plus ``plotting.<name>`` for each name in
``yellowfin_optax.plotting.__all__``.

Run this file as a script to regenerate README.md's API table from the
module (between the ``<!-- api-table-start -->`` and ``<!-- api-table-end -->``
markers)::

  python tests/test_docs.py
"""

import inspect
import os
import re
import types

import pytest

import yellowfin_optax
from yellowfin_optax import plotting

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')
START, END = '<!-- api-table-start -->', '<!-- api-table-end -->'


def public_names(module=yellowfin_optax):
  if hasattr(module, '__all__'):
    return list(module.__all__)
  return sorted(
      n for n, v in vars(module).items()
      if not n.startswith('_') and not isinstance(v, types.ModuleType))


def public_objects():
  objects = {n: getattr(yellowfin_optax, n) for n in public_names()}
  objects.update(
      {f'plotting.{n}': getattr(plotting, n) for n in public_names(plotting)})
  return objects


def _summary(obj) -> str:
  """First docstring line, rst roles turned into markdown code."""
  line = (inspect.getdoc(obj) or '').strip().splitlines()[0]
  line = re.sub(r':(?:func|class|meth|mod|attr):`~?([^`]+)`', r'`\1`', line)
  line = re.sub(r':math:`([^`]+)`', r'`\1`', line)
  line = line.replace('``', '`')
  return line.replace('|', '\\|')


def api_table() -> str:
  """The markdown API table (name | kind | what it is), from the module."""
  rows = ['| name | kind | what it is |', '|---|---|---|']
  objects = public_objects()
  def order(name):  # functions first, then state classes; plotting last
    return (name.startswith('plotting.'), inspect.isclass(objects[name]),
            name.lower())
  for name in sorted(objects, key=order):
    kind = 'class' if inspect.isclass(objects[name]) else 'function'
    rows.append(f'| `{name}` | {kind} | {_summary(objects[name])} |')
  return '\n'.join(rows)


def readme_table_names():
  with open(README, encoding='utf-8') as f:
    text = f.read()
  assert START in text and END in text, 'README.md lacks the API table markers'
  table = text[text.index(START) + len(START):text.index(END)]
  names = []
  for line in table.splitlines():
    match = re.match(r'\s*\|\s*`([^`]+)`\s*\|', line)
    if match:
      names.append(match.group(1))
  return names


@pytest.mark.parametrize('name', sorted(public_objects()))
def test_public_name_has_docstring(name):
  doc = inspect.getdoc(public_objects()[name])
  assert doc and len(doc.strip()) > 20, f'{name} has no real docstring'


@pytest.mark.parametrize(
    'name',
    sorted(n for n, o in public_objects().items()
           if inspect.isfunction(o)))
def test_public_function_has_examples_section(name):
  doc = inspect.getdoc(public_objects()[name])
  assert re.search(r'^Examples?:\s*$', doc, re.M), (
      f'{name} docstring has no Examples: section')
  assert '>>>' in doc.split('Examples:')[-1], f'{name} Examples has no doctest'


def test_readme_api_table_lists_exactly_the_public_names():
  listed = readme_table_names()
  assert len(listed) == len(set(listed)), 'duplicate rows in the API table'
  expected = set(public_objects())
  missing = sorted(expected - set(listed))
  extra = sorted(set(listed) - expected)
  assert not missing and not extra, (
      f'README API table is out of date: missing {missing}, extra {extra}. '
      'Regenerate it with: python tests/test_docs.py')


def test_readme_opens_with_the_two_setup_commands():
  with open(README, encoding='utf-8') as f:
    text = f.read()
  first_block = re.search(r'```[a-z]*\n(.*?)```', text, re.S).group(1)
  assert ("pip install -e '.[examples]' && python examples/digits.py"
          in first_block)
  assert "pip install -e '.[test]' && python -m pytest -n 2 -q" in first_block
  # The test command is the one CI runs.
  ci = os.path.join(os.path.dirname(README), '.ci', 'run')
  with open(ci, encoding='utf-8') as f:
    assert 'python -m pytest -n 2 -q' in f.read()


def _write_readme_table() -> None:
  with open(README, encoding='utf-8') as f:
    text = f.read()
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  with open(README, 'w', encoding='utf-8') as f:
    f.write(f'{head}{START}\n{api_table()}\n{END}{tail}')
  print(f'rewrote the API table in {README}')


if __name__ == '__main__':
  _write_readme_table()
