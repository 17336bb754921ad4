// "Show the request": the playground's call as curl, as a raw NATS request, and as openai-python code, built from
// the request body, the page's origin and the bus's chat subject; chat.js puts the text on the page (textContent).

import { bus } from "./app.js";

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

export function curlCommand(body) {
  return [
    `curl -sN ${location.origin}/v1/chat/completions \\`,
    `  -H 'Content-Type: application/json' \\`,
    `  -H "Authorization: Bearer $LLMBUS_API_KEY" \\`,
    `  -d ${shellQuote(JSON.stringify(body))}`,
  ].join("\n");
}

export function natsRequest(body, chatId) {
  const chatRequest = {
    chat_id: chatId,
    messages: body.messages,
    max_tokens: body.max_tokens,
    temperature: body.temperature,
    stream: true,
  };
  return [
    `subject: ${bus.chatSubject}`,
    "headers: Llmbus-Request-Id: <your id> (optional; publish to the cancel subject with it to stop)",
    "body:",
    JSON.stringify(chatRequest, null, 2),
    "",
    "# The answer arrives on the reply inbox as ChatChunk messages, the last with done: true.",
    `# One-shot from the nats CLI (set "stream": false): nats req ${bus.chatSubject} '<body>'`,
  ].join("\n");
}

export function pythonCode(body) {
  return [
    "import os",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("LLMBUS_API_KEY", "none"))`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(body.model)},`,
    `    messages=${JSON.stringify(body.messages, null, 4).replaceAll("\n", "\n    ")},`,
    `    temperature=${Number.isInteger(body.temperature) ? body.temperature.toFixed(1) : body.temperature},`,
    `    max_tokens=${body.max_tokens},`,
    "    stream=True,",
    '    stream_options={"include_usage": True},',
    ")",
    "for chunk in stream:",
    "    if chunk.choices and chunk.choices[0].delta.content:",
    '        print(chunk.choices[0].delta.content, end="", flush=True)',
  ].join("\n");
}
