import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(
    r'__version__ = "([^"]+)"', (here / "selchat" / "_version.py").read_text()
).group(1)

setup(
    name="selchat",
    version=version,
    description="A direct-chat server on a single-threaded selectors reactor, and its terminal client",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["selchat", "selchat.*"]),
    python_requires=">=3.10",
    install_requires=[
        "click>=8.1",
        "prompt_toolkit>=3.0.36",
        "h11>=0.14",                             # HTTP/1.1 parsing for the server's /metrics
        'tomli>=1.1; python_version < "3.11"',   # the client's config file (tomllib from 3.11)
    ],
    extras_require={
        # `selchat serve --cluster redis://...`: hiredis.Reader is the RESP parser the
        # reactor feeds (sans-I/O, C); the socket stays ours.
        "cluster": ["hiredis>=2.0"],
        # `selchat serve --db postgresql://...`: psycopg 3 in the account worker threads.
        "postgres": ["psycopg[binary]>=3.1"],
        "test": ["pytest>=7", "hypothesis>=6.80", "pexpect>=4.8", "trustme>=1.0", "prometheus_client>=0.16",
                 "pytest-randomly>=3.12", "pytest-xdist>=3.5", "hiredis>=2.0", "psycopg[binary]>=3.1"],
    },
    entry_points={"console_scripts": ["selchat=selchat.cli:main"]},
)
