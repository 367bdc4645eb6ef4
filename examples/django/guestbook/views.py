import collections
import sys

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from .forms import MessageForm, NoteForm
from .models import Note

# The latest messages posted to this interpreter. Each isolate has its own copy, so with
# several isolates a page lists only the messages that its own isolate received.
MAX_KEPT_MESSAGES = 100
ENTRIES = collections.deque(maxlen=MAX_KEPT_MESSAGES)


@require_http_methods(["GET", "POST"])
def index(request):
    status = 200
    if request.method == "POST":
        form = MessageForm(request.POST)
        if form.is_valid():
            text = form.cleaned_data["message"]
            ENTRIES.append(text)
            # The messages framework keeps the value in a cookie, so the page after the
            # redirect shows it even when another isolate handles that request.
            messages.success(request, text)
            return redirect("guestbook:index")
        status = 400
    else:
        form = MessageForm()

    context = {
        "form": form,
        "entries": list(ENTRIES),
        "python_version": sys.version.split()[0],
        "platform": sys.platform,
    }
    return render(request, "guestbook/index.html", context, status=status)


@require_http_methods(["GET", "POST"])
def notes(request):
    """A model form: each valid post saves one Note row in the SQLite database."""
    status = 200
    if request.method == "POST":
        form = NoteForm(request.POST)
        if form.is_valid():
            form.save()
            return redirect("guestbook:notes")
        status = 400
    else:
        form = NoteForm()
    context = {"form": form, "notes": Note.objects.all()[:50], "count": Note.objects.count()}
    return render(request, "guestbook/notes.html", context, status=status)
