import pathlib

import gin


def test_import_gin_is_the_library_not_the_config_folder():
    repo = pathlib.Path(__file__).resolve().parents[1]
    assert hasattr(gin, "parse_config_files_and_bindings")
    assert not (repo / "gin" / "__init__.py").exists()
    assert repo / "gin" not in pathlib.Path(gin.__file__).resolve().parents
