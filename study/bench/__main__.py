"""`python -m study.bench`: the same as `study bench`."""

from study.bench import main

main()
