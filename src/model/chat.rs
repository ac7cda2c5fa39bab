//! Chat prompts: the GGUF `tokenizer.chat_template` (Jinja) rendered with minijinja.

use minijinja::{context, Environment};
use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// ChatML, used when a model carries no template.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

pub struct ChatTemplate {
    source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: Option<&str>, bos_token: String, eos_token: String) -> ChatTemplate {
        ChatTemplate {
            source: source.unwrap_or(CHATML).to_string(),
            bos_token,
            eos_token,
        }
    }

    /// Renders the conversation, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let mut env = Environment::new();
        // Templates are written for Python's Jinja: allow str methods like .strip().
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}

/// Drops the oldest exchange after the first `keep` messages (a system prompt, say): a
/// message and, when it was the user's, the answer after it, so that turns still
/// alternate as templates expect. The last message is never dropped. Returns how many
/// went (0: nothing left to drop).
pub fn drop_oldest_exchange(messages: &mut Vec<ChatMessage>, keep: usize) -> usize {
    if messages.len() <= keep + 1 {
        return 0;
    }
    let first = messages.remove(keep);
    let answered =
        first.role == "user" && messages.len() > keep + 1 && messages[keep].role == "assistant";
    if answered {
        messages.remove(keep);
        return 2;
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(m: &[ChatMessage]) -> Vec<&str> {
        m.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn the_oldest_exchange_goes_and_the_system_prompt_and_last_message_stay() {
        let mut m: Vec<ChatMessage> = [
            ("system", "s"),
            ("user", "u1"),
            ("assistant", "a1"),
            ("user", "u2"),
            ("assistant", "a2"),
            ("user", "u3"),
        ]
        .iter()
        .map(|(r, c)| ChatMessage::new(r, c))
        .collect();
        assert_eq!(drop_oldest_exchange(&mut m, 1), 2);
        assert_eq!(contents(&m), ["s", "u2", "a2", "u3"]);
        assert_eq!(drop_oldest_exchange(&mut m, 1), 2);
        assert_eq!(contents(&m), ["s", "u3"]);
        assert_eq!(drop_oldest_exchange(&mut m, 1), 0);
        assert_eq!(contents(&m), ["s", "u3"]);
        // Without a system prompt, and with an unanswered user message before the last.
        let mut m = vec![
            ChatMessage::new("user", "u1"),
            ChatMessage::new("user", "u2"),
        ];
        assert_eq!(drop_oldest_exchange(&mut m, 0), 1);
        assert_eq!(contents(&m), ["u2"]);
    }

    #[test]
    fn chatml_fallback_renders_turns() {
        let t = ChatTemplate::new(None, String::new(), String::new());
        let s = t.render(&[ChatMessage::new("user", "hi")]).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }
}
