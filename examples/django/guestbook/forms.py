from django import forms

from .models import Note


class MessageForm(forms.Form):
    message = forms.CharField(max_length=1000)


class NoteForm(forms.ModelForm):
    class Meta:
        model = Note
        fields = ["text"]
