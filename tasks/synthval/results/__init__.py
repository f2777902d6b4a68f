"""Published results: which model a result is of, the SQL store of result records, and the leaderboard read
from it. Imported by the Airflow plugin too, so nothing here imports torch."""
