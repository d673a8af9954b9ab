"""Print the pip requirements of one extra of pyproject.toml, for the image build.

The image installs its dependencies in a layer of their own, before the
source is copied, so they are read from pyproject.toml here rather than
listed a second time. The build backend (``build-system.requires``) comes
along so that the package itself then installs without the network.

    python3 requirements.py cpu > requirements.txt
"""

import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)

extra = sys.argv[1]
project = pyproject["project"]
requirements = [
    *pyproject["build-system"]["requires"],
    *project["dependencies"],
    *project["optional-dependencies"][extra],
]
print("\n".join(requirements))
