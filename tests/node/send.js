// Submit one message with Nodemailer from a transport URL (argv[2]), trusting the CA in
// argv[3]; prints the server's reply to DATA, or the error, as one JSON line.
const fs = require("fs");
const nodemailer = require("nodemailer");

const [url, caFile, from, to] = process.argv.slice(2);
// the URL as a PDS gives it; the CA beside it (a test certificate, not a public one)
const transport = nodemailer.createTransport({ url, tls: { ca: fs.readFileSync(caFile) } });
transport
  .sendMail({ from, to, subject: "from nodemailer", text: "hello over smtps on a starttls port" })
  .then((info) => console.log(JSON.stringify({ ok: true, response: info.response })))
  .catch((err) => {
    console.log(JSON.stringify({ ok: false, error: String(err && err.message) }));
    process.exitCode = 1;
  });
