from django.db import models


class Note(models.Model):
    """A note saved in the SQLite database, shared by every isolate of the example."""

    text = models.CharField(max_length=1000)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self):
        return self.text
